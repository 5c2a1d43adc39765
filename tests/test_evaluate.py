"""Held-out evaluation (self-VQA metrics on T2I-CompBench, GenEval and user files), the promotion gate, and the
self-improvement loop that chains rounds through it."""

import json
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from ospo_core import evaluate as ev
from ospo_core import store
from ospo_core.config import EVAL_DEMO_OVERRIDES, EvalConfig, GateConfig, deep_update
from ospo_core.janus import score as janus_score
from ospo_core.plugins import tools_for
from ospo_core.records import EVAL, SCHEMAS, to_table
from ospo_core.stages.common import row_seed
from test_flow import small_config


def eval_config(**overrides) -> EvalConfig:
    return EvalConfig.model_validate(deep_update(EVAL_DEMO_OVERRIDES, overrides))


def geneval_prompt(prompt: str, include: list, exclude: list = (), tag: str = "t") -> ev.EvalPrompt:
    return ev.EvalPrompt("geneval", "x", tag, prompt, (tag,), tuple({"count": 1, **e} for e in include),
                         tuple(exclude))


# ---------------------------------------------------------------- prompt sets


def test_shipped_prompt_sets_load_from_the_package():
    data = files("ospo_core").joinpath("data", "benchmarks")
    assert data.joinpath("t2i-compbench", "LICENSE").read_text().startswith("MIT License")
    assert data.joinpath("geneval", "LICENSE").read_text().startswith("MIT License")
    assert "MIT" in data.joinpath("SOURCE.md").read_text()

    t2i = ev.load_prompt_set("t2i-compbench")
    assert list(dict.fromkeys(p.category for p in t2i)) == list(ev.T2I_COMPBENCH_CATEGORIES)
    assert len(t2i) == 2400 and all(p.prompt == p.prompt.strip() and "\r" not in p.prompt for p in t2i)
    assert t2i[0] == ev.EvalPrompt("t2i-compbench", "color-000", "color", "a green bench and a blue bowl")

    geneval = ev.load_prompt_set("geneval")
    assert len(geneval) == 553 and all(p.has_metadata and p.tags == (p.category,) for p in geneval)
    assert {p.category for p in geneval} == {"single_object", "two_object", "counting", "colors", "position",
                                              "color_attr"}
    limited = ev.load_prompt_set("geneval", limit=2)
    assert [p.category for p in limited] == [c for c in dict.fromkeys(p.category for p in geneval) for _ in (0, 1)]
    assert [p.prompt for p in limited[:2]] == [p.prompt for p in geneval[:2]]  # the first N, in file order


def test_user_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "mine.txt"
    plain.write_text("a red cup\n\n  two cats on a bench  \r\n")
    prompts = ev.load_prompt_set(str(plain))
    assert [(p.prompt_id, p.category, p.prompt) for p in prompts] == [("00000", "all", "a red cup"),
                                                                       ("00001", "all", "two cats on a bench")]
    name = prompts[0].prompt_set
    assert name.startswith("mine-") and name == ev.prompt_set_name(str(plain))
    plain.write_text("a blue cup\n")
    assert ev.prompt_set_name(str(plain)) != name  # an edited file is another prompt set

    rows = [{"prompt": "a photo of a dog left of a cup", "tag": "position",
             "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]},
            {"prompt": "a cat wearing a hat", "category": "animals", "id": "cat-1"}]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    structured, free = ev.load_prompt_set(str(jsonl))
    assert (structured.category, structured.tags, structured.has_metadata) == ("position", ("position",), True)
    assert (free.prompt_id, free.category, free.tags, free.has_metadata) == ("cat-1", "animals", (), False)


@pytest.mark.parametrize("line, problem", [
    ('{"text": "a cup"}', "unknown field(s) ['text']"),
    ('{"prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"prompt": "a", "include": [{"count": 2}]}', "needs a 'class'"),
    ('{"prompt": "a", "include": [{"class": "cat", "count": 0}]}', "'count' must be a whole number >= 1"),
    ('{"prompt": "a", "include": [{"class": "cat", "position": ["near", 0]}]}', "'position' must be [relation"),
    ('{"prompt": "a", "include": [{"class": "cat", "position": ["above", 3]}]}', "refers to include[3]"),
    ('{"prompt": "a", "exclude": [{"class": "cat"}]}', "'exclude' needs an 'include'"),
    ('{"prompt": "a"', "line 1: not valid JSON"),
    ('{"prompt": "a", "id": "1"}\n{"prompt": "b", "id": "1"}', "prompt ids ['1'] are used more than once"),
])
def test_bad_prompt_files_are_refused_with_the_problem_named(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError) as error:
        ev.load_prompt_set(str(path))
    assert problem in str(error.value)
    with pytest.raises(ValueError, match="neither one of"):
        ev.load_prompt_set(str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------- GenEval metadata -> questions


def test_geneval_metadata_becomes_questions():
    by_tag = {}
    for p in ev.load_prompt_set("geneval"):
        by_tag.setdefault(p.category, p)
    expected = {
        "single_object": ["Is there a bench?"],
        "two_object": ["Is there a bench?", "Is there a sports ball?"],
        # GenEval caps a count with an exclude entry at count + 1: that is "exactly two"
        "counting": ["Are there exactly two clocks?"],
        "colors": ["Is there a fire hydrant?", "Is the fire hydrant blue?"],
        # a two-object position entry: both existence questions, then the position question
        "position": ["Is there a teddy bear?", "Is there a dog?", "Is the dog to the right of the teddy bear?"],
        "color_attr": ["Is there a wine glass?", "Is the wine glass purple?", "Is there an apple?",
                       "Is the apple black?"],
    }
    assert {tag: ev.geneval_questions(p) for tag, p in by_tag.items()} == expected


def test_counts_colours_positions_and_plurals():
    q = ev.geneval_questions
    assert q(geneval_prompt("three cats", [{"class": "cat", "count": 3}])) == ["Are there three cats?"]
    # the plural as the prompt writes it (GenEval writes "benchs"), else English rules
    assert q(geneval_prompt("four benchs", [{"class": "bench", "count": 4}])) == ["Are there four benchs?"]
    assert q(geneval_prompt("some", [{"class": "bus", "count": 2, "color": "red"}])) == [
        "Are there two buses?", "Are the buses red?"]
    assert q(geneval_prompt("p", [{"class": "umbrella"}, {"class": "person", "count": 2, "position": ["above", 0]},
                                  {"class": "cat", "position": ["below", 1]}])) == [
        "Is there an umbrella?", "Are there two people?", "Is there a cat?",
        "Are the people above the umbrella?", "Is the cat below the people?"]
    assert q(geneval_prompt("p", [{"class": "dog"}], [{"class": "dog", "count": 2}])) == ["Is there exactly one dog?"]
    assert q(geneval_prompt("p", [{"class": "dog"}], [{"class": "cat", "count": 1}, {"class": "cow", "count": 3}])) \
        == ["Is there a dog?", "Is there no cat?", "Are there fewer than three cows?"]
    assert ev.plural("wine glass") == "wine glasses" and ev.plural("cherry") == "cherries"
    # every shipped entry gives questions; every position entry names both of its objects
    for p in ev.load_prompt_set("geneval"):
        questions = ev.geneval_questions(p)
        assert questions and all(x.endswith("?") for x in questions)
        for entry in p.include:
            if "position" in entry:
                other = p.include[entry["position"][1]]["class"]
                assert questions[-1] == (f"Is the {entry['class']} {ev.POSITION_PHRASES[entry['position'][0]]} "
                                         f"the {other}?")


# ---------------------------------------------------------------- metrics


def recompute(table: pa.Table) -> dict:
    """The metric formulas, written out again on the recorded p_yes/p_no."""
    categories = {}
    for row in table.to_pylist():
        if row["ok"]:
            score = sum(y - n for y, n in zip(row["p_yes"], row["p_no"])) / len(row["p_yes"])
            categories.setdefault(row["category"], []).append((score, all(y > n for y, n in zip(row["p_yes"],
                                                                                             row["p_no"]))))
    per = {c: (sum(s for s, _ in v) / len(v), sum(a for _, a in v) / len(v)) for c, v in categories.items()}
    return {"categories": per,
            "overall": (sum(m for m, _ in per.values()) / len(per), sum(a for _, a in per.values()) / len(per))}


def assert_metrics_match(table: pa.Table, metrics: ev.EvalMetrics) -> None:
    want = recompute(table)
    got = {c: (m.mean_score, m.all_yes) for c, m in metrics.categories.items() if m.scored}
    assert got.keys() == want["categories"].keys()
    for c, (score, all_yes) in want["categories"].items():
        assert got[c] == pytest.approx((score, all_yes), abs=1e-12)
    assert (metrics.overall["mean_score"], metrics.overall["all_yes"]) == pytest.approx(want["overall"], abs=1e-12)
    assert metrics.images == table.num_rows and metrics.scored == sum(table.column("ok").to_pylist())


def test_metrics_follow_the_formulas_on_a_controlled_judge(tiny, monkeypatch):
    """Judge answers (p_yes, p_no) fixed per question:

    color, image 1: (0.9, 0.1), (0.6, 0.3) -> score (0.8 + 0.3) / 2 = 0.55, every answer yes
    color, image 2: (0.9, 0.1), (0.2, 0.7) -> score (0.8 - 0.5) / 2 = 0.15, not all yes
    spatial:        (0.4, 0.5)             -> score -0.1, not all yes; a second prompt has no questions
    color: mean 0.35, all_yes 0.5; spatial: mean -0.1, all_yes 0; overall = mean over categories: 0.125, 0.25
    """
    answers = {"Is it red?": [(0.9, 0.1)], "Is it round?": [(0.6, 0.3), (0.2, 0.7)], "Is it left?": [(0.4, 0.5)]}
    seen = {}

    def judge(bundle, images, questions, batch_size=8):
        out = []
        for qs in questions:
            row = []
            for question in qs:
                options = answers[question]
                row.append(options[min(seen.get(question, 0), len(options) - 1)])
                seen[question] = seen.get(question, 0) + 1
            out.append(row)
        return out

    monkeypatch.setattr(janus_score, "score_yes_no", judge)
    rows = [dict(prompt_set="s", prompt_id="c1", category="color", tags=["a"], prompt="a red ball",
                 questions=["Is it red?", "Is it round?"], source="model", ok=True),
            dict(prompt_set="s", prompt_id="s1", category="spatial", tags=["b"], prompt="a ball on the left",
                 questions=["Is it left?"], source="model", ok=True),
            dict(prompt_set="s", prompt_id="s2", category="spatial", tags=["b"], prompt="nonsense", source="model",
                 ok=False, reason="no_marker")]
    questions = to_table(rows, SCHEMAS["eval_questions"])
    table = ev.evaluate(questions, tools_for(tiny), eval_config(images_per_prompt=2, seed=7))
    assert table.num_rows == 6
    assert table.column("score").to_pylist() == pytest.approx([0.55, 0.15, -0.1, -0.1, None, None])
    assert table.column("all_yes").to_pylist() == [True, False, False, False, None, None]
    assert table.column("reason").to_pylist()[-2:] == ["no_questions", "no_questions"]
    assert table.column("seed").to_pylist()[:2] == [row_seed(7, "c1", 0), row_seed(7, "c1", 1)]
    metrics = ev.eval_metrics(table)
    assert metrics.categories["color"].mean_score == pytest.approx(0.35)
    assert metrics.categories["color"].all_yes == 0.5
    assert (metrics.categories["spatial"].images, metrics.categories["spatial"].scored) == (4, 2)
    assert metrics.overall == pytest.approx({"mean_score": 0.125, "all_yes": 0.25})
    assert (metrics.tags["a"].pass_rate, metrics.tags["b"].pass_rate) == (0.5, 0.0)
    assert metrics.rejected == {"no_questions": 2}
    assert_metrics_match(table, metrics)
    assert ev.JUDGE_NOTE in ev.metrics_text(metrics) and "not GenEval's object detector" in ev.JUDGE_NOTE


@pytest.mark.parametrize("prompt_set, limit", [("t2i-compbench", 2), ("geneval", 1)])
def test_tiny_model_on_the_shipped_sets(tiny, prompt_set, limit):
    cfg = eval_config(prompt_set=prompt_set, limit=limit)
    prompts = ev.load_prompt_set(prompt_set, limit)
    questions = ev.eval_questions(prompts, tiny, cfg.questions)
    assert questions.num_rows == len(prompts)
    if prompt_set == "geneval":
        assert set(questions.column("source").to_pylist()) == {"metadata"} and all(questions.column("ok").to_pylist())
    else:  # the tiny model's text never parses: structured fallback, or an honest failure that stays in the table
        sources = questions.column("source").to_pylist()
        assert set(sources) <= {"model", "fallback"} and "fallback" in sources
        assert all(r["ok"] == (r["source"] == "fallback") for r in questions.to_pylist())
    table = ev.evaluate(questions, tools_for(tiny), cfg)
    assert table.num_rows == len(prompts) * cfg.images_per_prompt
    assert table.schema.equals(EVAL)
    metrics = ev.eval_metrics(table)
    assert set(metrics.categories) == {p.category for p in prompts}
    assert all(metrics.categories[c].scored > 0 for c in metrics.categories)
    assert_metrics_match(table, metrics)
    if prompt_set == "geneval":  # per-tag pass rate = the tag's all-yes fraction
        assert {t: m.pass_rate for t, m in metrics.tags.items()} == {
            c: m.all_yes for c, m in metrics.categories.items()}
    assert Image.open(__import__("io").BytesIO(table.column("image")[0].as_py()["bytes"])).size == (64, 64)


def test_tiny_model_on_a_user_file_is_reproducible(tiny, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "a photo of two cats", "tag": "counting",
                                "include": [{"class": "cat", "count": 2}]}) + "\n"
                    + json.dumps({"prompt": "a red apple on a bench", "category": "color"}) + "\n"
                    + json.dumps({"prompt": "zxq blorp", "category": "color"}) + "\n")
    cfg = eval_config(prompt_set=str(path), images_per_prompt=2)
    prompts = ev.load_prompt_set(str(path))
    questions = ev.eval_questions(prompts, tiny, cfg.questions)
    assert questions.column("questions").to_pylist()[:2] == [["Are there two cats?"],
                                                             ["Is there a red apple?", "Is there a bench?"]]
    assert questions.column("source").to_pylist()[:2] == ["metadata", "fallback"]
    assert questions.column("reason").to_pylist()[2] is not None  # nothing to read from it: kept as a failure
    table = ev.evaluate(questions, tools_for(tiny), cfg)
    metrics = ev.eval_metrics(table)
    assert metrics.rejected == {"no_questions": 2} and metrics.scored == 4
    assert_metrics_match(table, metrics)
    again = ev.evaluate(questions, tools_for(tiny), cfg)  # same model, prompts and seeds -> the same images and scores
    assert store.content_hash(again) == store.content_hash(table)
    with pytest.raises(ValueError, match="a model must write their questions"):
        ev.eval_questions(prompts, None, cfg.questions)


# ---------------------------------------------------------------- the gate


def metrics(**by_category) -> ev.EvalMetrics:
    return ev.EvalMetrics(prompt_set="geneval", images=len(by_category), scored=len(by_category), rejected={},
                          tags={}, categories={c: ev.CategoryMetrics(images=1, scored=1 if v is not None else 0,
                                                                     mean_score=v, all_yes=v)
                                               for c, v in by_category.items()})


def test_gate_promotes_an_improvement_and_refuses_a_regression():
    cfg = GateConfig(metric="mean_score", min_improvement=0.05, max_category_drop=0.1)
    up = ev.gate_decision(metrics(a=0.1, b=0.3), metrics(a=0.3, b=0.25), cfg)
    assert up.promote and up.reason.startswith("promoted: mean_score 0.2000 -> 0.2750 (+0.0750")
    assert up.deltas == pytest.approx({"a": 0.2, "b": -0.05})
    down = ev.gate_decision(metrics(a=0.3, b=0.3), metrics(a=0.2, b=0.3), cfg)
    assert not down.promote and "below the required improvement +0.0500" in down.reason
    assert (down.before, down.after) == pytest.approx((0.3, 0.25))
    # the overall metric rises but one category falls beyond the tolerance
    traded = ev.gate_decision(metrics(a=0.1, b=0.5), metrics(a=0.6, b=0.3), cfg)
    assert not traded.promote and "categories fell by more than 0.1000: b -0.2000" in traded.reason
    # a category that can no longer be scored is a loss, not a skipped line
    lost = ev.gate_decision(metrics(a=0.1, b=0.1), metrics(a=0.9, b=None), cfg)
    assert not lost.promote and "['b'] have no scored image after training" in lost.reason
    # exactly the threshold counts, despite float rounding (0.3 - 0.1 = 0.19999999999999998)
    assert ev.gate_decision(metrics(a=0.1), metrics(a=0.3), GateConfig(min_improvement=0.2)).promote
    with pytest.raises(ValueError, match="one prompt set"):
        ev.gate_decision(metrics(a=0.1), metrics(a=0.2).model_copy(update={"prompt_set": "t2i-compbench"}), cfg)


# ---------------------------------------------------------------- flows


def test_evaluate_flow_and_cli_write_tables_metrics_plot_and_artifacts(prefect, tmp_path, capsys):
    from prefect import get_client

    from flows.evaluate import ospo_evaluate
    from ospo_cli.main import main

    result = ospo_evaluate(eval_config(prompt_set="geneval", limit=1), home=str(tmp_path), model="tiny")
    folder = Path(result["folder"])
    assert folder.parent.parent == tmp_path / "evals" and folder.name == "geneval"
    table = store.read_table(folder / "eval", EVAL, name="eval")
    assert table.num_rows == 6 and store.content_hash(table) == result["eval"]["hash"]
    assert json.loads((folder / "metrics.json").read_text()) == result["metrics"]
    assert_metrics_match(table, ev.EvalMetrics.model_validate(result["metrics"]))
    assert Image.open(result["plot"]).format == "PNG"
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
        plot_md = client.read_latest_artifacts()
    eval_id = folder.parent.name
    assert f"{eval_id}-eval-geneval-model-metrics" in keys and f"{eval_id}-eval-geneval-model-metrics-plot" in keys
    markdown = next(a.data for a in plot_md if a.key == f"{eval_id}-eval-geneval-model-metrics-plot")
    assert result["plot"] in markdown and "](data:image/png;base64," in markdown and ev.JUDGE_NOTES["fixed"] in markdown

    user = tmp_path / "prompts.txt"
    user.write_text("a red apple\ntwo cats\n")
    assert main(["eval", "--model", "tiny", "--prompts", str(user), "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and ev.JUDGE_NOTES["fixed"] in out and "eval table:" in out
    assert main(["eval", "--round", "nope", "--prompts", "geneval", "--home", str(tmp_path)]) == 2


def test_two_rounds_through_the_gate(prefect, tmp_path, monkeypatch, capsys):
    """A controlled judge: p_yes depends only on how many adapters the judged model carries (0 -> 0.2, 1 -> 0.6,
    2 -> 0.4; p_no = 1 - p_yes), so the local score is 2 p_yes - 1 for every image:
    round 1: start (base) -0.6 -> trained (+ adapter 1) +0.2: improves, promoted;
    round 2: start (+ adapter 1) +0.2 -> trained (+ adapters 1, 2) -0.2: regresses, kept but not promoted,
    and the next round starts again from round 1's model."""
    from flows.self_improve import latest_promoted_model, self_improve
    from ospo_cli.main import main
    from ospo_core.config import SelfImproveConfig

    quality = {0: 0.2, 1: 0.6, 2: 0.4}

    def judge(bundle, images, questions, batch_size=8):
        p = quality[len(bundle.adapters)]
        return [[(p, 1 - p) for _ in qs] for qs in questions]

    monkeypatch.setattr(janus_score, "score_yes_no", judge)
    config = SelfImproveConfig(rounds=2, round_prefix="t", round=small_config(),
                               eval=eval_config(prompt_set="geneval", limit=1, judge="self"),
                               gate=GateConfig(min_improvement=0.1, max_category_drop=0.05), lineage="promoted")
    manifests = self_improve(config, home=str(tmp_path))
    first, second = manifests
    assert [m["promoted"] for m in manifests] == [True, False]

    # round 2 loaded round 1's adapter, and training changed the weights again
    assert second["model"]["adapters"] == [first["adapter"]]
    assert second["model"]["fingerprint"] == first["fingerprint_after"] != first["model"]["fingerprint"]
    assert second["fingerprint_after"] != first["fingerprint_after"]

    # the registry keeps both rounds, the lineage and every decision with its numbers
    r1, r2 = store.list_entries(tmp_path)
    assert (r1["round_id"], r2["round_id"]) == (first["round_id"], second["round_id"])
    assert r2["trained_from"] == r1["fingerprint"] and r2["adapters"] == [r1["adapter"]]
    assert (r1["gate"]["before"], r1["gate"]["after"]) == pytest.approx((-0.6, 0.2))
    assert (r2["gate"]["before"], r2["gate"]["after"]) == pytest.approx((0.2, -0.2))
    assert r1["decision"].startswith("promoted:") and r2["decision"].startswith("not promoted:")
    assert set(r2["gate"]["deltas"]) == {p.category for p in ev.load_prompt_set("geneval", 1)}
    assert all(d == pytest.approx(-0.4) for d in r2["gate"]["deltas"].values())
    assert r2["metrics"]["eval"]["start"]["overall"]["mean_score"] == pytest.approx(0.2)
    # both evaluations of a round were judged on one question sheet, with the same seeds
    evals = tmp_path / "runs" / second["round_id"] / "eval" / "geneval"
    start, trained = (store.read_table(evals / w / "eval", EVAL, name="eval") for w in ("start", "trained"))
    for column in ("prompt_id", "questions", "seed"):
        assert start.column(column).to_pylist() == trained.column(column).to_pylist()

    # the next round starts from the last promoted model: round 1's
    assert latest_promoted_model.fn(str(tmp_path), "tiny", []) == ("tiny", [first["adapter"]])
    assert main(["rounds", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"next round starts from: {first['round_id']}" in out and "not promoted:" in out
    assert "mean_score: 0.2000 -> -0.2000" in out
