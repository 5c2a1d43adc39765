"""The model registry is recoverable: two copies, a rebuild from the round manifests, and a loud stop (never a quiet
restart from the base model) when it is lost; retention is safe to run after every round."""

import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ospo_core import store

REPO = Path(__file__).resolve().parents[1]

def _close_round(home, round_id, finished, *, promoted=False, adapters=()):
    """What closing a round leaves behind: a finished manifest with an adapter, then the registry entry."""
    folder = store.round_dir(home, round_id)
    adapter = folder / "train" / "adapter"
    adapter.mkdir(parents=True)
    store.write_manifest(folder, {
        "round_id": round_id, "status": "finished", "finished": finished, "adapter": str(adapter),
        "model": {"source": "tiny", "adapters": list(adapters), "fingerprint": f"from-{round_id}"},
        "fingerprint_after": f"fp-{round_id}", "training": {"loss": 0.5},
    })
    entry = {"round_id": round_id, "model": "tiny", "adapters": list(adapters), "adapter": str(adapter),
             "promoted": promoted, "decision": "promoted" if promoted else "kept, not promoted"}
    store.register(home, entry)
    return entry


def _three_rounds(home):
    """r1 promoted, r2 closed unpromoted then promoted by the gate, r3 kept: the next start model is r2."""
    r1 = _close_round(home, "r1", "2025-01-01T00:00:01", promoted=True)
    r2 = _close_round(home, "r2", "2025-01-01T00:00:02", adapters=[r1["adapter"]])
    r3 = _close_round(home, "r3", "2025-01-01T00:00:03", adapters=[r1["adapter"]])
    r2 = {**r2, "promoted": True, "decision": "gate: +0.1", "metrics": {"eval": {"after": 0.7}}}
    store.register(home, r2)
    return [r1, r2, r3]


def _registry(home):
    return home / "models" / "registry.json"


def test_a_fresh_home_has_an_empty_lineage_and_its_first_round_registers(tmp_path):
    assert store.list_entries(tmp_path) == [] and store.latest_promoted(tmp_path) is None
    # The first round's own finished manifest exists before its registry entry: no false alarm.
    _close_round(tmp_path, "r1", "2025-01-01T00:00:01", promoted=True)
    assert store.latest_promoted(tmp_path)["round_id"] == "r1"


@pytest.mark.parametrize("damage", ["delete", "garbage bytes", "not a registry"])
def test_a_lost_or_damaged_registry_falls_back_to_its_copy_and_says_so(tmp_path, caplog, damage):
    entries = _three_rounds(tmp_path)
    assert _registry(tmp_path).with_name("registry.json.bak").read_bytes() == _registry(tmp_path).read_bytes()
    if damage == "delete":
        _registry(tmp_path).unlink()
    else:
        _registry(tmp_path).write_bytes(b"\xff\xfe\x00{" if damage == "garbage bytes" else b'{"entries": [{"x": 1}]}')
    with caplog.at_level(logging.WARNING, logger="ospo.store"):
        assert store.list_entries(tmp_path) == entries
    assert "registry.json.bak" in caplog.text and "ospo rounds --rebuild" in caplog.text
    store.register(tmp_path, {"round_id": "r4", "promoted": False})  # the next write restores both copies
    assert [e["round_id"] for e in store.list_entries(tmp_path)] == ["r1", "r2", "r3", "r4"]
    assert _registry(tmp_path).read_bytes() == _registry(tmp_path).with_name("registry.json.bak").read_bytes()


@pytest.mark.parametrize("damage", ["garbage bytes", "truncated", "wrong shape", "fifo", "both deleted"])
def test_an_unreadable_registry_stops_the_next_round_with_one_line(tmp_path, damage):
    _three_rounds(tmp_path)
    for path in (_registry(tmp_path), _registry(tmp_path).with_name("registry.json.bak")):
        path.unlink()
        if damage == "fifo":
            os.mkfifo(path)  # reading it would block forever
        elif damage != "both deleted":
            path.write_bytes({"garbage bytes": b"\x89PNG\xff", "truncated": b'{"entries": [{"round_id": "r1", "pro',
                              "wrong shape": b'{"entries": {"r1": true}}'}[damage])
    for read in (store.latest_promoted, store.list_entries):
        with pytest.raises(store.RegistryError) as caught:
            read(tmp_path)
        message = str(caught.value)
        assert str(_registry(tmp_path)) in message and "ospo rounds --rebuild" in message and "\n" not in message
    if damage == "both deleted":
        assert "3 finished round(s)" in message
    with pytest.raises(store.RegistryError):  # nor is it overwritten by the next registration
        store.register(tmp_path, {"round_id": "r4", "promoted": False})


def test_rebuild_restores_entries_order_and_promotion_decisions(tmp_path):
    entries = _three_rounds(tmp_path)
    (tmp_path / "runs" / "testbed-1").mkdir()  # not a round: no manifest
    store.lock_round(store.round_dir(tmp_path, "r5"))  # a round that is still running: no finished manifest
    store.unlock_round(store.round_dir(tmp_path, "r5"))
    _registry(tmp_path).write_text("{oops")
    _registry(tmp_path).with_name("registry.json.bak").unlink()
    assert store.rebuild_registry(tmp_path) == entries
    assert store.list_entries(tmp_path) == entries
    assert store.latest_promoted(tmp_path)["round_id"] == "r2"
    assert _registry(tmp_path).with_name("registry.json.corrupt").read_text() == "{oops"  # kept for inspection
    assert _registry(tmp_path).with_name("registry.json.bak").is_file()


def test_rebuild_of_a_manifest_without_a_recorded_decision_is_not_promoted_and_warns(tmp_path, caplog):
    folder = store.round_dir(tmp_path, "old")
    store.write_manifest(folder, {"status": "finished", "finished": "2024-12-31T00:00:00", "adapter": "/a",
                                  "model": {"source": "tiny", "adapters": [], "fingerprint": "f0"},
                                  "fingerprint_after": "f1", "training": {}})
    with caplog.at_level(logging.WARNING, logger="ospo.store"):
        (entry,) = store.rebuild_registry(tmp_path)
    assert entry["round_id"] == "old" and entry["promoted"] is False and entry["adapter"] == "/a"
    assert entry["trained_from"] == "f0" and entry["fingerprint"] == "f1"
    assert "old" in caplog.text and "not promoted" in caplog.text


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", b"{\"status\": ", b"[1, 2]"])
def test_a_garbage_manifest_is_one_line_naming_the_file(tmp_path, content):
    folder = store.round_dir(tmp_path, "r1")
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(content)
    for read in (lambda: store.read_manifest(folder), lambda: store.rebuild_registry(tmp_path)):
        with pytest.raises(store.CorruptFileError) as caught:
            read()
        message = str(caught.value)
        assert str(folder / "manifest.json") in message and "\n" not in message and "delete the round folder" in message


def _hold_round(path, locked, release):
    store.lock_round(path)
    locked.set()
    release.wait(30)


def test_retention_after_every_round_keeps_lineages_running_and_unregistered_rounds(tmp_path):
    entries = _three_rounds(tmp_path)  # r1 and r2 are promoted; r2 was trained on r1's adapter
    for n in range(4, 8):
        _close_round(tmp_path, f"r{n}", f"2025-01-01T00:00:0{n}", adapters=[entries[1]["adapter"]])
    crashed = store.round_dir(tmp_path, "crashed")  # never closed: stays resumable
    crashed.mkdir()
    store.lock_round(store.round_dir(tmp_path, "r3"))  # running in this process
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_round, args=(store.round_dir(tmp_path, "r4"), locked, release))
    holder.start()
    try:
        assert locked.wait(30)
        assert store.prune_rounds(tmp_path, keep_last=1) == ["r5", "r6"]
    finally:
        release.set()
        holder.join(30)
        store.unlock_round(store.round_dir(tmp_path, "r3"))
    kept = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert kept == ["crashed", "r1", "r2", "r3", "r4", "r7"]
    assert [e.get("pruned", False) for e in store.list_entries(tmp_path)] == [False] * 4 + [True, True, False]
    # Run again after the next round: the held rounds go now, the pruned ones are not counted again.
    assert store.prune_rounds(tmp_path, keep_last=1) == ["r3", "r4"]
    assert store.prune_rounds(tmp_path, keep_last=1) == []
    assert store.latest_promoted(tmp_path)["round_id"] == "r2"


# ---------------------------------------------------------------- plots of the rounds (matplotlib, Agg)

LABELS = ["start", "ospo-20250101-120000-1", "ospo-20250101-120000-2"]
PANELS = {"mean_score": {"overall": [0.1, 0.3, 0.2], "color": [0.0, None, 0.4]},
          "all_yes": {"overall": [0.5, 0.6, 0.4], "color": [0.4, 0.5, 0.6]}}


def test_metrics_plot_shows_every_panel_and_the_promotion_decisions():
    from ospo_core.report import metrics_plot

    image = metrics_plot(LABELS, PANELS, [None, True, False], title="geneval", note="self-judged " * 30)
    assert image.mode == "RGB" and image.width >= 640
    one_panel = metrics_plot(LABELS, {"mean_score": PANELS["mean_score"]}, [None, True, False], title="geneval")
    assert image.height > one_panel.height + 200  # a panel per metric
    # Filled and hollow markers differ: the decision is visible, not only the value.
    assert metrics_plot(LABELS, PANELS, [None, True, True], title="geneval", note="self-judged " * 30) != image


def test_ablation_plot_has_the_requested_size_and_follows_the_numbers():
    from ospo_core.testbed.report import results_plot

    rows = [{"setting": s, "seed": seed, "round": n, "category": "all", "exact": 0.3 + 0.1 * n + 0.01 * seed,
             "hallucination": 0.2 - 0.02 * n} for s in ("sft", "ospo") for seed in range(2) for n in range(3)]
    image = results_plot(rows, width=800, height=360)
    assert image.size == (800, 360) and image.mode == "RGB"
    rows[-1] = {**rows[-1], "exact": 0.9}
    assert results_plot(rows, width=800, height=360) != image


def test_plotting_keeps_imports_cheap_and_stays_off_pyplot():
    """Importing the report modules loads no matplotlib; plotting uses the Agg canvas and never pyplot's global
    figures (which leak memory and are not thread-safe in Prefect's worker threads)."""
    code = ("import sys; import ospo_core.report, ospo_core.testbed.report; assert 'matplotlib' not in sys.modules; "
            "ospo_core.report.metrics_plot(['a', 'b'], {'m': {'overall': [0.0, 1.0]}}, [None, True], title='t'); "
            "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
