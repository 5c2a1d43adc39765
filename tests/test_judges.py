"""Judges: GenEval's rules on hand-worked detections, the geneval and vqa judges end to end on random-weight tiny
folders through `ospo eval`, and the fixed judge refusing a round that only taught the model to say "yes"."""

import json
from pathlib import Path

import pytest
import torch

from ospo_core import evaluate as ev
from ospo_core.config import EVAL_DEMO_OVERRIDES, EvalConfig, GateConfig, deep_update
from ospo_core.judges import geneval as g
from ospo_core.judges.geneval import Clause, Detection
from ospo_core.records import EVAL, EVAL_QUESTIONS, to_table
from ospo_core import store


def det(x0, y0, x1, y1, score=0.95) -> Detection:
    return Detection((x0, y0, x1, y1), score)


# ---------------------------------------------------------------- GenEval's rules, hand-worked


def test_confidence_thresholds_are_strict_and_counting_uses_0_9():
    found = {"clock": [det(0, 0, 9, 9, s) for s in (0.95, 0.9, 0.5, 0.31, 0.3)]}
    assert [d.score for d in g.keep_detections(found, counting=False)["clock"]] == [0.95, 0.9, 0.5, 0.31]
    assert [d.score for d in g.keep_detections(found, counting=True)["clock"]] == [0.95]  # 0.9 is not above 0.9
    assert g.keep_detections({"cat": [det(0, 0, 1, 1, 0.3)]}, counting=False) == {}  # a class left empty vanishes
    many = {"cup": [det(0, 0, 1, 1, 0.5 + i / 100) for i in range(20)]}
    assert len(g.keep_detections(many, counting=False)["cup"]) == g.MAX_OBJECTS == 16


def test_counts_at_the_counting_threshold():
    """"Are there exactly two clocks?" (GenEval: include count 2 + exclude count 3) on a counting prompt."""
    classes = g.geneval_classes()
    clause = g.parse_question("Are there exactly two clocks?", classes)
    assert clause == Clause("exactly", "clock", 2)

    def holds(scores):
        kept = g.keep_detections({"clock": [det(0, 0, 9, 9, s) for s in scores]}, counting=True)
        return g.check_clauses([clause], kept, {})[0]

    assert holds([0.95, 0.92])
    assert not holds([0.95, 0.9])  # the second clock sits at the threshold: one clock
    assert not holds([0.95, 0.92, 0.91])  # three clocks: the exclude half fails
    assert holds([0.95, 0.92, 0.9])  # the third is at the threshold, not counted
    assert g.parse_question("Are there fewer than three cows?", classes) == Clause("fewer", "cow", 3)
    assert g.parse_question("Is there no cat?", classes) == Clause("fewer", "cat", 1)


def test_relative_position_at_the_margin():
    """A and B are 10 x 10 boxes, A's centre `o` pixels left of B's: the offset shrinks by 0.1 x (10 + 10) = 2, so
    dx = -(o - 2) / o; "left of" needs dx < -0.5, i.e. o > 4. Within 2 pixels nothing is said."""
    b = det(100, 0, 110, 10)

    def a_at(o):
        return det(100 - o, 0, 110 - o, 10)

    assert g.relative_position(a_at(4.0), b) == set()  # dx = -0.5 exactly
    assert g.relative_position(a_at(4.1), b) == {"left of"}  # dx = -2.1 / 4.1 = -0.512
    assert g.relative_position(a_at(2.0), b) == set()  # the shrunk offset is 0
    assert g.relative_position(b, a_at(30)) == {"right of"}
    # diagonal: offset (-10, -10), shrunk to (-8, -8), / 14.14 = -0.566 on both axes (image y grows down)
    assert g.relative_position(det(0, 0, 10, 10), det(10, 10, 20, 20)) == {"left of", "above"}


def test_position_needs_both_groups_matched_and_every_pair_to_stand_so():
    classes = g.geneval_classes()
    questions = ["Is there a teddy bear?", "Is there a dog?", "Is the dog to the right of the teddy bear?"]
    clauses = [g.parse_question(q, classes) for q in questions]
    assert clauses[2] == Clause("position", "dog", relation="right of", other="teddy bear")
    bear, dog_right, dog_left = det(0, 0, 10, 10), det(50, 0, 60, 10), det(-50, 0, -40, 10)
    assert g.check_clauses(clauses, {"teddy bear": [bear], "dog": [dog_right]}, {}) == [True, True, True]
    assert g.check_clauses(clauses, {"teddy bear": [bear], "dog": [dog_left]}, {}) == [True, True, False]
    assert g.check_clauses(clauses, {"dog": [dog_right]}, {}) == [False, True, False]  # no target group
    # two dogs asked for: both must stand right of the bear
    two = [g.parse_question(q, classes) for q in ["Is there a teddy bear?", "Are there two dogs?",
                                                   "Are the dogs to the right of the teddy bear?"]]
    assert g.check_clauses(two, {"teddy bear": [bear], "dog": [dog_right, dog_left]}, {})[2] is False


def test_colour_ties_go_to_the_first_colour_and_colour_counts_use_the_counted_objects():
    red, orange = torch.zeros(len(g.COLORS), 2), None
    red[g.COLORS.index("red")] = torch.tensor([1.0, 0.0])
    red[g.COLORS.index("orange")] = torch.tensor([1.0, 0.0])  # the same text embedding: a tie
    red[g.COLORS.index("blue")] = torch.tensor([0.0, 1.0])
    crops = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert g.classify_colours(crops, red) == ["red", "blue", "blue"]  # red before orange in GenEval's list
    classes = g.geneval_classes()
    clauses = [g.parse_question(q, classes) for q in ["Are there two buses?", "Are the buses red?"]]
    assert clauses == [Clause("at_least", "bus", 2), Clause("colour", "bus", colour="red")]
    buses = {"bus": [det(0, 0, 5, 5), det(9, 9, 15, 15)]}
    assert g.check_clauses(clauses, buses, {"bus": ["red", "red"]}) == [True, True]
    assert g.check_clauses(clauses, buses, {"bus": ["red", "blue"]}) == [True, False]  # both counted must be red
    assert g.parse_question("Is there a red apple?", classes) == Clause("colour", "apple", 1, "red")
    assert g.parse_question("What is the apple made of?", classes) is None
    assert g.parse_question("Is there a unicorn?", classes) is None  # no such class


def test_every_geneval_question_reads_back_into_a_clause():
    classes = g.geneval_classes()
    for prompt in ev.load_prompt_set("geneval"):
        for question in ev.geneval_questions(prompt):
            assert g.parse_question(question, classes) is not None, (prompt.prompt, question)


# ---------------------------------------------------------------- geneval and vqa judges end to end


@pytest.fixture(scope="module")
def judge_folders(tmp_path_factory):
    from helpers.tiny_judges import build_blip_vqa, build_clip, build_owlvit

    root = tmp_path_factory.mktemp("judges")
    build_clip(root / "geneval" / "clip")
    build_owlvit(root / "geneval" / "detector")
    (root / "vqa").mkdir()
    (root / "vqa" / "clip").symlink_to(root / "geneval" / "clip")
    build_blip_vqa(root / "vqa" / "vqa")
    return root


def test_geneval_and_vqa_judges_run_end_to_end_through_ospo_eval(prefect, tiny, judge_folders, tmp_path, capsys):
    from ospo_cli.main import main
    from ospo_core.judges.vqa import VQAJudge

    home = tmp_path / "home"
    geneval = tmp_path / "geneval.jsonl"  # GenEval metadata rows: a counting, a colour and a position prompt
    geneval.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a photo of three clocks", "tag": "counting",
         "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}]},
        {"prompt": "a photo of a red bus", "tag": "colors", "include": [{"class": "bus", "count": 1, "color": "red"}]},
        {"prompt": "a photo of a dog right of a teddy bear", "tag": "position",
         "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]},
    ]) + "\n")
    assert main(["eval", "--model", "tiny", "--prompts", str(geneval), "--judge", "geneval",
                 "--judge-model", str(judge_folders / "geneval"), "--home", str(home)]) == 0
    assert ev.JUDGE_NOTES["geneval"] in capsys.readouterr().out
    folder = next((home / "evals").glob(f"*/{ev.prompt_set_name(str(geneval))}"))
    table = store.read_table(folder / "eval", EVAL, name="eval").to_pylist()
    assert len(table) == 3 and all(r["ok"] for r in table)
    for row in table:  # one GenEval clause per question, answered 1 or 0; all_yes is GenEval's "correct"
        assert set(zip(row["p_yes"], row["p_no"])) <= {(1.0, 0.0), (0.0, 1.0)}
        assert row["all_yes"] == all(y == 1.0 for y in row["p_yes"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["judge"] == ev.JUDGE_NOTES["geneval"]

    # vqa: a non-spatial prompt (CLIPScore) and a colour prompt (BLIP-VQA product), drawn and judged in process
    from ospo_core.plugins import tools_for

    rows = [{"prompt_set": "mixed", "prompt_id": str(i), "category": c, "tags": [], "prompt": p,
             "questions": ["Is there a dog?", "Is the dog red?"], "source": "model", "ok": True}
            for i, (c, p) in enumerate([("non_spatial", "a dog holding a cat"), ("color", "a red dog")])]
    cfg = EvalConfig.model_validate(deep_update(EVAL_DEMO_OVERRIDES, {"judge": "vqa"}))
    tools = tools_for(tiny, judge="vqa", judge_model=str(judge_folders / "vqa"))
    table = ev.evaluate(to_table(rows, EVAL_QUESTIONS), tools, cfg).to_pylist()
    judge = VQAJudge(None, str(judge_folders / "vqa"))
    for row in table:
        assert row["ok"] and all(0 < y < 1 and y + n == pytest.approx(1) for y, n in zip(row["p_yes"], row["p_no"]))
        if row["category"] == "non_spatial":  # CLIPScore: the cosine of CLIP's image and prompt embeddings
            assert row["score"] == pytest.approx(judge.image_scores([row], [[(0.5, 0.5)]])[0], abs=1e-5)
        else:  # T2I-CompBench's BLIP-VQA score: the product of p_yes
            assert row["score"] == pytest.approx(torch.tensor(row["p_yes"]).prod().item(), abs=1e-6)

    # the same judges in a round's self-VQA stage: a question outside GenEval's grammar stays unanswered, counted
    from PIL import Image

    from ospo_core.config import VQAConfig
    from ospo_core.records import IMAGES, QUESTIONS, image_cell
    from ospo_core.stages.vqa import self_vqa

    image = {"item_id": "0000000", "t2i_category": "layout", "sub_category": "layout2", "side": "base", "k": 0,
             "image": image_cell(Image.new("RGB", (64, 64), "red")), "ok": True}
    asked = {"item_id": "0000000", "t2i_category": "layout", "sub_category": "layout2", "side": "base", "k": -1,
             "questions": ["Are there two dogs?", "Is the mood cheerful?"], "ok": True}
    vqa = self_vqa(to_table([image], IMAGES), to_table([asked], QUESTIONS),
                   tools_for(tiny, judge="geneval", judge_model=str(judge_folders / "geneval")), VQAConfig())
    assert vqa.column("ok").to_pylist() == [True, False]
    assert vqa.column("reason").to_pylist()[1] == "geneval_unknown_question"
    vqa = self_vqa(to_table([image], IMAGES), to_table([asked], QUESTIONS),
                   tools_for(tiny, judge="vqa", judge_model=str(judge_folders / "vqa")), VQAConfig())
    assert all(vqa.column("ok").to_pylist()) and all(0 < p < 1 for p in vqa.column("p_yes").to_pylist())

    with pytest.raises(ValueError, match="no detector/config.json"):
        g.GenEvalJudge(None, str(judge_folders / "vqa"))


# ---------------------------------------------------------------- a round that only teaches "yes"


def _yes_only_adapter(start, folder: Path, steps: int = 12) -> Path:
    """A LoRA on the language model (and its text head, which the random tiny model needs to say anything with
    confidence) trained only to answer "yes" to the understanding chat (the self-VQA prompt), on noise images and
    GenEval-style questions: what a round that games its own judge would learn."""
    from peft import LoraConfig, get_peft_model

    from ospo_core.janus.load import LORA_TARGET_REGEX, load_janus, write_adapter_meta
    from ospo_core.janus.score import _encode, yes_no_ids

    bundle = load_janus("tiny", device="cpu")
    model = get_peft_model(bundle.model, LoraConfig(r=8, lora_alpha=16, target_modules=f"{LORA_TARGET_REGEX}|lm_head"))
    yes = yes_no_ids(bundle.tokenizer)[0][0]
    generator = torch.Generator().manual_seed(0)
    from PIL import Image

    images = [Image.fromarray((torch.rand(64, 64, 3, generator=generator) * 255).byte().numpy()) for _ in range(4)]
    questions = ["Is there a dog?", "Are there two cats?", "Is the bench red?", "Is the cup to the left of the dog?"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(steps):
        enc = _encode(bundle, images[step % 4], questions)
        logits = model(**enc, logits_to_keep=1).logits[:, -1].float()  # (Q, V)
        loss = torch.nn.functional.cross_entropy(logits, torch.full((len(questions),), yes))
        if loss.item() < 0.05:  # p(yes) > 0.95: learnt (and further steps only crawl through denormal gradients)
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    write_adapter_meta(folder, start.fingerprint)
    return folder


def test_a_yes_only_round_is_promoted_by_the_self_judge_and_refused_by_the_fixed_judge(tiny, tmp_path):
    from ospo_core.janus.load import load_janus
    from ospo_core.plugins import tools_for

    adapter = _yes_only_adapter(tiny, tmp_path / "yes-adapter")
    trained = load_janus("tiny", device="cpu", adapters=[adapter])
    start = (tiny.source, tuple(tiny.adapters), tiny.fingerprint)
    cfg = EvalConfig.model_validate(deep_update(EVAL_DEMO_OVERRIDES, {"prompt_set": "geneval", "limit": 1}))
    questions = ev.eval_questions(ev.load_prompt_set("geneval", 1), None, cfg.questions)

    before = ev.eval_metrics(ev.evaluate(questions, tools_for(tiny, judge="fixed"), cfg), "fixed")
    after_table = ev.evaluate(questions, tools_for(trained, judge="fixed", start=start), cfg)
    after = ev.eval_metrics(after_table, "fixed")
    own = ev.eval_metrics(ev.rejudge(after_table, tools_for(trained, judge="self").judge), "self")
    gate = GateConfig(metric="mean_score", min_improvement=0.05, max_category_drop=0.05)

    by_self = ev.gate_decision(before, own, gate)
    by_fixed = ev.gate_decision(before, after, gate)
    assert by_self.promote, by_self.reason  # the trained model likes its own images: it answers yes
    assert not by_fixed.promote, by_fixed.reason  # the start model sees no better drawing
    drift = ev.judge_drift(after, own, "mean_score")
    assert drift["overall"] > 0.5 and all(d > 0 for d in drift.values())
    assert own.overall["all_yes"] > after.overall["all_yes"]
