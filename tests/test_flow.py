"""A round through Prefect on the tiny model: tables, counts, caching, re-computation of what changed only."""

import datasets
import pyarrow.parquet as pq
import pytest

from ospo_core import store
from ospo_core.config import DEMO_OVERRIDES, RoundConfig, deep_update
from ospo_core.records import SCHEMAS

STAGE_TASKS = ["generate-prompts", "perturb", "densify", "render", "questions", "self-vqa", "select-pairs", "train"]

# A few prompts in four sub-categories, short text budgets: the whole round takes well under a minute.
SMALL = deep_update(DEMO_OVERRIDES, {
    "prompts": {"sub_categories": ["color1", "2D_spatial", "numeracy2", "complex"],
                "quotas": {"color1": 2, "2D_spatial": 1, "numeracy2": 1, "complex": 1},
                "max_new_tokens": 8, "repeat": 2},
    "perturb": {"max_new_tokens": 8}, "densify": {"max_new_tokens": 8}, "questions": {"max_new_tokens": 8},
    "train": {"max_steps": 2, "save_steps": 2},
    "shard_rows": 8,
})


def small_config(**overrides) -> RoundConfig:
    return RoundConfig.model_validate(deep_update(SMALL, overrides))


def task_states(flow_run_id) -> dict[str, str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


@pytest.fixture(scope="module")
def first_round(prefect, tmp_path_factory):
    from flows.round import ospo_round

    home = tmp_path_factory.mktemp("home")
    state = ospo_round(small_config(round_id="r1"), home=str(home), return_state=True)
    return home, state


def test_round_writes_every_table_and_counts_add_up(first_round):
    home, state = first_round
    manifest = state.result()
    tables = manifest["tables"]
    assert set(tables) == {"prompts", "negatives", "dense", "images", "questions", "vqa", "pairs", "train_history"}
    for name, info in tables.items():
        table = store.read_table(info["path"], SCHEMAS[name], name=name)
        assert table.num_rows == info["rows"] > 0
        assert store.content_hash(table) == info["hash"]
        for shard in sorted(__import__("pathlib").Path(info["path"]).glob("part-*.parquet")):
            pq.read_table(shard)
    counts = {n: t["counts"] for n, t in tables.items()}
    ok_prompts = counts["prompts"]["ok"]
    assert ok_prompts == 5  # the quotas, met by model output or the structured fallback
    assert counts["negatives"]["rows"] == 3 * ok_prompts  # one row per (item, k): rows in = ok + rejected
    assert counts["dense"]["rows"] == counts["negatives"]["ok"]
    assert counts["images"]["rows"] == 2 * counts["dense"]["ok"]
    assert counts["questions"]["rows"] == ok_prompts + counts["negatives"]["ok"]
    assert counts["pairs"]["rows"] == ok_prompts and counts["pairs"]["ok"] > 0
    ds = datasets.load_dataset("parquet", data_files=f"{tables['pairs']['path']}/*.parquet", split="train")
    assert ds[0]["chosen"].size == (64, 64)
    assert (home / "runs" / "r1" / "contact_sheet.png").is_file()
    assert (home / "runs" / "r1" / "train" / "adapter" / "adapter_model.safetensors").is_file()
    entry = store.list_entries(home)[-1]
    assert entry["round_id"] == "r1" and entry["promoted"] and entry["trained_from"] == manifest["model"]["fingerprint"]


def test_rerun_is_cached_and_a_changed_stage_recomputes_only_what_follows(first_round):
    from flows.round import ospo_round

    home, _ = first_round
    again = ospo_round(small_config(round_id="r1"), home=str(home), return_state=True)
    states = task_states(again.state_details.flow_run_id)
    assert {states[t] for t in STAGE_TASKS} == {"Cached"}, states
    before = again.result()["tables"]["pairs"]["hash"]
    changed = ospo_round(small_config(round_id="r1", select={"margin": -0.5}), home=str(home), return_state=True)
    states = task_states(changed.state_details.flow_run_id)
    assert {t: states[t] for t in STAGE_TASKS[:6]} == {t: "Cached" for t in STAGE_TASKS[:6]}
    assert states["select-pairs"] == "Completed"
    # training is keyed by the content of the pairs table: the same pairs (the tiny model's p_yes - p_no is far
    # above -0.5) need no new adapter; a training change recomputes training alone
    assert changed.result()["tables"]["pairs"]["hash"] == before and states["train"] == "Cached"
    retrained = ospo_round(small_config(round_id="r1", select={"margin": -0.5}, train={"max_steps": 3}),
                           home=str(home), return_state=True)
    states = task_states(retrained.state_details.flow_run_id)
    assert {t: states[t] for t in STAGE_TASKS[:7]} == {t: "Cached" for t in STAGE_TASKS[:7]}
    assert states["train"] == "Completed"
    # a new adapter, not the old one resumed from the earlier run's checkpoints
    assert retrained.result()["fingerprint_after"] != again.result()["fingerprint_after"]


def test_a_deleted_table_is_recomputed_not_trusted(first_round):
    from flows.round import ospo_round

    home, _ = first_round
    questions = home / "runs" / "r1" / "questions"
    for shard in questions.glob("part-*.parquet"):
        shard.unlink()
    state = ospo_round(small_config(round_id="r1", select={"margin": -0.5}), home=str(home), return_state=True)
    states = task_states(state.state_details.flow_run_id)
    assert states["questions"] == "Completed" and states["render"] == "Cached"
    assert list(questions.glob("part-*.parquet"))


def test_an_edited_shard_is_recomputed_and_said_so(first_round):
    """A valid but edited shard (two rows dropped) no longer matches the sha256 recorded when it was written: the
    rerun recomputes that shard alone and the table is whole again."""
    from flows.round import ospo_round

    home, _ = first_round
    images = home / "runs" / "r1" / "images"
    rows = store.read_table(images, SCHEMAS["images"], name="images").num_rows
    shard = sorted(images.glob("part-*.parquet"))[-1]
    others = {p: p.stat().st_mtime_ns for p in images.glob("part-*.parquet") if p != shard}
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 2), shard)
    state = ospo_round(small_config(round_id="r1", select={"margin": -0.5}), home=str(home), return_state=True)
    assert state.result()["tables"]["images"]["rows"] == rows
    assert {p: p.stat().st_mtime_ns for p in others} == others  # the intact shards were not redone
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert any(f"{shard.name} changed since it was written" in log.message for log in logs)


def test_a_failed_rerun_keeps_the_finished_round_and_records_the_attempt(first_round):
    """The README's `--set select.rule=v3` on the tiny model selects no pair: the rerun stops with the selection's
    counts in one message, the finished round's manifest (status, config, adapter) is untouched, and the attempt is
    recorded as failed."""
    import json

    from flows.round import ospo_round

    home, _ = first_round
    manifest = home / "runs" / "r1" / "manifest.json"
    before = manifest.read_bytes()
    state = ospo_round(small_config(round_id="r1", select={"rule": "v3", "min_chosen_score": 1.0}), home=str(home),
                       return_state=True)
    assert state.is_failed()
    message = str(state.message)
    assert "selected no preference pairs" in message and "no_chosen_candidate" in message, message
    assert manifest.read_bytes() == before and json.loads(before)["status"] == "finished"
    attempts = [json.loads(p.read_text()) for p in (home / "runs" / "r1" / "attempts").glob("*.json")]
    failed = [a for a in attempts if a["flow_run_id"] == str(state.state_details.flow_run_id)]
    assert failed and failed[0]["status"] == "failed" and failed[0]["config"]["select"]["rule"] == "v3"
    assert store.list_entries(home)[-1]["round_id"] == "r1"  # the registry still lists the finished round


def test_the_cpu_estimate_of_this_round_is_within_2x_of_its_measured_time(first_round):
    """`ospo estimate`'s CPU profile (fixed cost + throughput per stage, fitted by python -m bench.round
    --write-profile cpu on two demo-preset rounds) against this smaller round's measured stage times."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ospo_core.estimate import estimate

    _, state = first_round
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    measured = sum(run.total_run_time.total_seconds() for run in runs if run.name.rsplit("-", 1)[0] in STAGE_TASKS)
    estimated = sum(e.seconds for e in estimate(small_config(round_id="r1"), size="tiny", device="cpu"))
    assert measured / 2 <= estimated <= 2 * measured, (estimated, measured)
