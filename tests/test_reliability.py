"""Crash anywhere, resume exactly; bad input gives clear errors; concurrent rounds; untrusted files."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from ospo_core import store
from ospo_core.records import IMAGES, VQA

DRIVER = Path(__file__).parent / "helpers" / "crash_driver.py"
REPO = Path(__file__).resolve().parent.parent


def run_driver(stage: str, home: Path, delay: float = 0.0, **popen):
    env = {**os.environ, "CRASH_DRIVER_DELAY": str(delay), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(DRIVER), stage, str(home)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def finish(stage: str, home: Path) -> None:
    proc = run_driver(stage, home)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]


def kill_when(proc, ready, home: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` once `ready()` holds; meanwhile every shard under its final name must be a whole Parquet file."""
    deadline = time.time() + timeout
    while not ready():
        for shard in home.rglob("part-*.parquet"):
            pq.read_metadata(shard)  # raises on a partial file
        assert proc.poll() is None, "the stage finished before the kill point; raise CRASH_DRIVER_DELAY"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def table(home: Path, name: str, schema):
    return store.read_table(home / "runs" / "crash" / name, schema, name=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    home = tmp_path_factory.mktemp("reference")
    finish("train", home)
    return home


@pytest.mark.parametrize("kill_points", [(1,), (2, 5)])
def test_rendering_and_vqa_resume_exactly_after_sigkill(reference, tmp_path, kill_points):
    images = tmp_path / "runs" / "crash" / "images"
    for n in kill_points:  # kill, restart, kill again later: each run keeps what the previous one finished
        proc = run_driver("render", tmp_path, delay=0.3)
        kill_when(proc, lambda: len(shards(images)) >= n, tmp_path)
    kept = {p.name: p.stat().st_mtime_ns for p in shards(images)}
    vqa = tmp_path / "runs" / "crash" / "vqa"
    proc = run_driver("vqa", tmp_path, delay=0.3)
    kill_when(proc, lambda: len(shards(vqa)) >= 2, tmp_path)
    finish("vqa", tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in shards(images) if p.name in kept} == kept  # not redone
    for name, schema in (("images", IMAGES), ("vqa", VQA)):
        got, want = table(tmp_path, name, schema), table(reference, name, schema)
        assert store.content_hash(got) == store.content_hash(want)  # same rows, same order, no duplicates
    keys = table(tmp_path, "images", IMAGES).select(["item_id", "side", "k"]).to_pylist()
    assert len(keys) == len({tuple(k.values()) for k in keys})


def test_training_resumes_from_its_last_checkpoint_after_sigkill(reference, tmp_path):
    finish("vqa", tmp_path)
    train = tmp_path / "train"
    proc = run_driver("train", tmp_path, delay=0.4)
    kill_when(proc, lambda: (train / "checkpoint-4" / "trainer_state.json").is_file(), tmp_path)
    assert not (train / "adapter").exists()
    finish("train", tmp_path)
    ours = load_file(train / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "train" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)


def test_a_full_disk_fails_the_stage_cleanly_and_a_rerun_completes(tmp_path, monkeypatch):
    import pyarrow as pa

    from ospo_core.records import TRAIN_HISTORY

    table_ = pa.Table.from_pylist([{"step": 1, "metric": "loss", "value": 1.0}], schema=TRAIN_HISTORY)
    real = pq.write_table

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(OSError, match="No space left"):
        store.write_table(table_, tmp_path / "t")
    assert list((tmp_path / "t").iterdir()) == []  # no partial file, not even a temporary one
    monkeypatch.setattr(pq, "write_table", real)  # space freed
    store.write_table(table_, tmp_path / "t")
    assert store.read_table(tmp_path / "t", TRAIN_HISTORY).num_rows == 1


def test_the_same_round_cannot_run_twice_at_once(tmp_path):
    code = ("import sys, time; from ospo_core import store; store.lock_round(sys.argv[1]); print('locked', "
            "flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r1")], stdout=subprocess.PIPE,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(store.RoundBusyError, match="being run by pid"):
            store.lock_round(tmp_path / "r1")
        store.lock_round(tmp_path / "r2")  # another round on the same OSPO_HOME is fine
        store.unlock_round(tmp_path / "r2")
    finally:
        holder.kill()
        holder.wait()
    store.lock_round(tmp_path / "r1")  # a dead holder's lock is gone: the round can be resumed at once
    store.unlock_round(tmp_path / "r1")


def test_no_config_can_write_outside_ospo_home(tmp_path):
    from pydantic import ValidationError

    from ospo_core.config import RoundConfig

    for bad in ("../escape", "/abs", "a/b", ".."):
        with pytest.raises(ValidationError, match="round_id"):
            RoundConfig(round_id=bad)
        with pytest.raises(ValueError, match="invalid round id"):
            store.round_dir(tmp_path, bad)


def test_stage_tasks_store_no_results_the_marker_on_disk_is_the_cache():
    """One cache truth: stage tasks neither cache nor persist results in Prefect (nothing is pickled there); a cache
    hit is decided by the stage marker and the sha256 of the files."""
    from prefect.cache_policies import NO_CACHE

    from tasks import stages
    from tasks.runner import StageTask

    declared = [getattr(stages, name) for name in dir(stages) if isinstance(getattr(stages, name), StageTask)]
    assert len(declared) >= 9
    for stage_task in declared:
        assert stage_task.task.persist_result is False and stage_task.task.cache_policy is NO_CACHE


def test_invalid_config_values_are_refused_with_the_field_name():
    from pydantic import ValidationError

    from ospo_core.config import PromptsConfig, RenderConfig, SelectConfig

    for model, field, value in ((RenderConfig, "cfg_weight", -1.0), (PromptsConfig, "quotas", {"color1": 0}),
                                (SelectConfig, "rule", "v9")):
        with pytest.raises(ValidationError, match=field):
            model(**{field: value})


def test_retention_prunes_old_rounds_but_never_a_promoted_lineage(tmp_path):
    for n in range(5):
        adapter = tmp_path / "runs" / f"r{n}" / "train" / "adapter"
        adapter.mkdir(parents=True)
        os.utime(tmp_path / "runs" / f"r{n}", (n, n))  # r0 is the oldest
        store.register(tmp_path, {"round_id": f"r{n}", "promoted": n == 1, "adapter": str(adapter),
                                  "adapters": [str(tmp_path / "runs" / "r0" / "train" / "adapter")] if n == 1 else []})
    pruned = store.prune_rounds(tmp_path, keep_last=2)
    assert sorted(pruned) == ["r2"]  # r0 and r1 form the promoted lineage; r3, r4 are the newest two
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r0", "r1", "r3", "r4"]
    assert [e.get("pruned", False) for e in store.list_entries(tmp_path)] == [False, False, True, False, False]


def test_no_code_unpickles_or_trusts_remote_code():
    sources = [p for d in ("ospo_core", "tasks", "flows") for p in (REPO / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        assert "import pickle" not in text and "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


# ---------------------------------------------------------------- CUDA out of memory


def test_oom_backoff_halves_the_batch_and_training_keeps_pairs_per_step(caplog):
    from ospo_core.config import RenderConfig, TrainConfig
    from tasks.context import with_oom_backoff

    def run_fitting(limit):  # a stage that runs out of memory above `limit` rows per batch
        seen = []

        def run(cfg):
            seen.append((cfg.batch_size, getattr(cfg, "gradient_accumulation_steps", None)))
            if cfg.batch_size > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return "done"
        return run, seen

    run, seen = run_fitting(2)
    assert with_oom_backoff(run, RenderConfig(batch_size=8)) == "done"
    assert seen == [(8, None), (4, None), (2, None)]

    run, seen = run_fitting(2)
    with caplog.at_level("WARNING", logger="ospo"):
        with_oom_backoff(run, TrainConfig(batch_size=6, gradient_accumulation_steps=4))
    assert seen == [(6, 4), (3, 8), (1, 24)]  # 24 pairs per optimizer step throughout
    assert caplog.messages[-1] == "CUDA out of memory: retrying with batch_size=1, gradient_accumulation_steps=24"

    run, seen = run_fitting(0)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # nothing left to halve: the stage fails and says why
        with_oom_backoff(run, RenderConfig(batch_size=2))
    assert seen == [(2, None), (1, None)]


def test_out_of_memory_in_a_data_parallel_training_process_reaches_the_back_off(tmp_path, monkeypatch):
    import io

    from ospo_core.config import TrainConfig
    from ospo_core.train import launch

    class DyingRun:  # torch.distributed.run whose worker ran out of memory
        def __init__(self, output: str):
            self.stdout, self.returncode = io.StringIO(output), 1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    job = launch.TrainJob(model="tiny", fingerprint="f", pairs=str(tmp_path / "pairs"), train=TrainConfig(),
                          output_dir=str(tmp_path / "train"))
    crash = "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB\n"
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: DyingRun(crash))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="(?s)2 processes.*CUDA out of memory"):
        launch.train_data_parallel(job, 2)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: DyingRun("ValueError: bad pairs\n"))
    with pytest.raises(RuntimeError, match="(?s)exit code 1.*bad pairs") as failed:
        launch.train_data_parallel(job, 2)
    assert not isinstance(failed.value, torch.cuda.OutOfMemoryError)
