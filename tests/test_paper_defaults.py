"""The paper's defaults a round relies on besides the presets (test_config.py): the stage-1 shortfall reported per
sub-category, the held-out validation split, and where self-improvement starts the next round (lineage)."""

from ospo_core import store
from ospo_core.config import PromptsConfig
from ospo_core.records import PROMPTS, to_table
from ospo_core.stages.prompts import prompt_shortfall
from ospo_core.train.trainer import split_validation


def test_stage_1_shortfall_is_reported_per_sub_category():
    """color2, shape2 and texture2 are all attribute2 (2 + 2 + 2 wanted); color1 is attribute1_color (2 wanted)."""
    cfg = PromptsConfig(sub_categories=("color1", "color2", "shape2", "texture2"), max_len=2)
    rows = [{"sub_category": "attribute1_color", "ok": True}] * 2 + [{"sub_category": "attribute2", "ok": True}] * 4
    rows += [{"sub_category": "attribute2", "ok": False, "reason": "no_marker"}] * 7
    assert prompt_shortfall(to_table(rows, PROMPTS), cfg) == {
        "attribute2": {"wanted": 6, "accepted": 4, "missing": 2}}
    assert prompt_shortfall(to_table(rows[:2], PROMPTS), PromptsConfig(sub_categories=("color1",), max_len=2)) == {}


def test_validation_holds_out_a_stable_share_and_never_everything():
    ids = [f"{i:07d}" for i in range(400)]
    held = split_validation(ids, 0.05, seed=42)
    assert 8 <= sum(held) <= 35  # about 5%
    assert split_validation(list(reversed(ids)), 0.05, seed=42) == list(reversed(held))  # by id, not position
    assert split_validation(ids[:2], 0.05, seed=42).count(True) == 1  # at least one held out, one trained
    assert split_validation(ids[:3], 0.99, seed=42).count(False) == 1
    assert not any(split_validation(ids, 0.0, seed=42)) and split_validation(ids[:1], 0.5, seed=42) == [False]


def test_lineage_latest_continues_from_the_last_round_promoted_or_not(tmp_path):
    from flows.self_improve import latest_promoted_model

    for n, promoted in ((1, True), (2, False)):
        (tmp_path / "runs" / f"r{n}").mkdir(parents=True)
        store.register(tmp_path, {"round_id": f"r{n}", "model": "tiny", "adapters": ["a1"] if n == 2 else [],
                                  "adapter": f"a{n}", "promoted": promoted})
    assert latest_promoted_model.fn(str(tmp_path), "tiny", [], "latest") == ("tiny", ["a1", "a2"])  # the paper
    assert latest_promoted_model.fn(str(tmp_path), "tiny", [], "promoted") == ("tiny", ["a1"])
    assert latest_promoted_model.fn(str(tmp_path / "empty"), "tiny", ["x"], "latest") == ("tiny", ["x"])
