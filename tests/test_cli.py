"""The `ospo` command: bad input fails at once and writes nothing; a killed `ospo run` resumes where it stopped."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest

from ospo_core import store
from ospo_cli.main import main
from ospo_core.config import DEMO_OVERRIDES
from ospo_core.records import IMAGES
from tasks.runner import MARKER
from test_flow import small_config


def test_a_missing_model_folder_fails_at_once_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--model", "/does/not/exist", "--home", str(tmp_path / "home")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: model folder /does/not/exist does not exist") and "--model tiny" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting, message", [
    ("render.cfg_weight=-1", "render.cfg_weight: Input should be greater than or equal to 0"),
    ("train.max_stepz=20", "train.max_stepz: Extra inputs are not permitted"),
    ("train.max_steps", "expected key=value, e.g. --set train.max_steps=20"),
    ("select.rule=v9", "select.rule: Input should be 'v2', 'v1' or 'v3'"),
    ("round_id=../../etc", "invalid round id '../../etc'"),
])
def test_a_bad_set_fails_at_once_naming_the_setting_and_writes_nothing(tmp_path, monkeypatch, capsys, setting,
                                                                       message):
    monkeypatch.chdir(tmp_path)
    preset = copy.deepcopy(DEMO_OVERRIDES)
    assert main(["run", "--home", str(tmp_path / "home"), "--set", setting]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert DEMO_OVERRIDES == preset  # the settings went into a copy of the preset, not into the preset


@pytest.mark.slow
def test_a_run_killed_while_rendering_resumes_without_redoing_finished_shards(prefect, tmp_path):
    """SIGKILL `ospo run` once the first image shard is on disk, then run the same round again: the shards that were
    finished are kept as they are (same mtime), the rest are drawn, and no image appears twice."""
    from prefect.settings import PREFECT_API_URL

    # both runs report to the session's test server and share one result store, as two runs on one machine would
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect")}
    config = small_config(shard_rows=4)  # four dense rows per shard: rendering takes several shards
    settings = tmp_path / "round.json"
    settings.write_text(json.dumps(config.model_dump(mode="json", exclude={"round_id", "model"})))
    home = tmp_path / "home"
    command = [sys.executable, "-m", "ospo_cli", "run", "--home", str(home), "--config", str(settings),
               "--round", "killed"]
    images = home / "runs" / "killed" / "images"

    with open(tmp_path / "first.out", "wb") as out:
        first = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (images / "part-00000.parquet").exists():
            assert first.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "rendering never started"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (images / MARKER).exists(), "the kill came after rendering had finished"
    finished = {p.name: p.stat().st_mtime_ns for p in images.glob("part-*.parquet")}

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "round killed finished" in second.stdout and "adapter:" in second.stdout  # the summary

    shards = {p.name: p.stat().st_mtime_ns for p in images.glob("part-*.parquet")}
    assert len(shards) > len(finished) >= 1
    assert {name: shards[name] for name in finished} == finished
    table = store.read_table(images, IMAGES, name="images")
    keys = pc.binary_join_element_wise(table["item_id"], table["side"], pc.cast(table["k"], "string"), "/")
    assert len(pc.unique(keys)) == table.num_rows
    manifest = json.loads((home / "runs" / "killed" / "manifest.json").read_text())
    assert table.num_rows == manifest["tables"]["images"]["rows"] == 2 * manifest["tables"]["dense"]["counts"]["ok"]



# ---------------------------------------------------------------- one-line errors (issue 19, point 8)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("content, expected", [
    (b"train: !!python/object/apply:os.system ['touch pwned']\n", "not a plain YAML/JSON file of round settings"),
    (b"train:\n  max_steps: \xff\xfe20\n", "not UTF-8 text (byte 0xff at offset 20); save it as UTF-8"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, content, expected):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "round.yaml"
    config.write_bytes(content)
    assert main(["run", "--home", str(tmp_path / "home"), "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert f"--config {config}: {expected}" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "home").exists()


@pytest.mark.parametrize("content, expected", [
    (b"a red apple\n\xff two cats\n", "not UTF-8 text (byte 0xff at offset 12); save it as UTF-8"),
    (b"\n  \n", "holds no prompts"),
    (b'{"text": "a red apple"}\n', "line 1"),
])
def test_a_bad_prompt_file_is_refused_before_any_server_or_model_starts(tmp_path, capsys, content, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    started = time.monotonic()
    assert main(["eval", "--prompts", str(prompts), "--home", str(tmp_path / "home")]) == 2
    err = one_line_error(capsys)
    assert f"--prompts {prompts}: " in err and expected in err
    assert time.monotonic() - started < 10 and not (tmp_path / "home").exists()


def test_inspect_refuses_a_path_and_a_garbage_manifest_in_one_line(tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["inspect", "../x", "--home", str(home)]) == 2
    assert "invalid round id '../x'" in one_line_error(capsys)
    (home / "runs" / "r1").mkdir(parents=True)
    (home / "runs" / "r1" / "manifest.json").write_bytes(b"\x00garbage{")
    assert main(["inspect", "r1", "--home", str(home)]) == 2
    err = one_line_error(capsys)
    assert str(home / "runs" / "r1" / "manifest.json") in err and "restore it, or delete the round folder" in err


def test_a_round_already_running_is_refused_at_once_in_one_line(tmp_path, capsys):
    home = tmp_path / "home"
    (home / "runs" / "busy").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ospo_core import store; "
                               f"store.lock_round(store.round_dir({str(home)!r}, 'busy')); print('locked', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", "--home", str(home), "--round", "busy"]) == 2
        err = one_line_error(capsys)
        assert f"round busy is being run by pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()


def test_an_unwritable_home_is_refused_before_the_model_loads(tmp_path, capsys):
    # below a regular file: no folder can be made there, even by root (for whom chmod 500 changes nothing)
    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "home"
    started = time.monotonic()
    assert main(["run", "--home", str(home)]) == 2
    err = one_line_error(capsys)
    assert f"artifact folder {home} is not writable (Not a directory)" in err and "--home or set OSPO_HOME" in err
    assert time.monotonic() - started < 5


def test_rounds_rebuild_rebuilds_the_registry_from_the_manifests_and_says_what(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    calls = []

    def rebuild_registry(path):
        calls.append(path)
        return [{"round_id": "r1"}, {"round_id": "r2"}]

    monkeypatch.setattr(store, "rebuild_registry", rebuild_registry, raising=False)
    assert main(["rounds", "--rebuild", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert calls == [home]
    assert f"rebuilt {home / 'models' / 'registry.json'} from 2 round manifest(s): r1, r2" in out
