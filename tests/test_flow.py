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
