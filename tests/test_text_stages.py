"""The text stages (prompts, perturb, densify, questions): golden rows with scripted model answers, then the tiny
model end to end with and without the structured fallback.

A scripted answer replaces `generate_text` inside the stage module, so the stage's own logic (quotas, dedup, ids,
rotation, seeds, fallbacks, row accounting) is checked against exact expectations.
"""

import random
from collections import Counter

import pyarrow as pa
import pytest

import ospo_core.stages.common as common
import ospo_core.stages.densify as densify_module
import ospo_core.stages.perturb as perturb_module
import ospo_core.stages.prompts as prompts_module
import ospo_core.stages.questions as questions_module
from ospo_core.plugins import tools_for
from ospo_core.config import DensifyConfig, PerturbConfig, PromptsConfig, QuestionsConfig
from ospo_core.records import DENSE, NEGATIVES, PROMPTS, QUESTIONS, to_table
from ospo_core.stages.common import row_seed
from ospo_core.stages.densify import densify
from ospo_core.stages.perturb import perturb
from ospo_core.stages.prompts import fallback_prompt, generate_prompts
from ospo_core.stages.questions import generate_questions
from ospo_core.templates import SUB_CATEGORIES, perturbations_for, prompt_template, vocabulary
from ospo_core.templates.parse import forbidden_substring, parse_relation



def only(quotas: dict[str, int]) -> dict:
    """PromptsConfig fields that run just these sub-categories with these quotas."""
    return {"sub_categories": tuple(quotas), "quotas": quotas}
REASONS = {"bad_format", "forbidden_substring", "empty", "duplicate", "over_quota", "role_token", "no_marker",
           "template_leak", "echo", "no_dense_prompt", "no_negative_dense_prompt", "no_questions"}


class Scripted:
    """Stands in for generate_text: answers each chat with answer(chat) and records every call."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def __call__(self, bundle, chats, *, seed, temperature, top_p, max_new_tokens, batch_size, progress=None):
        assert len(seed) == len(chats)
        self.calls.append({"chats": chats, "seed": list(seed), "temperature": temperature, "top_p": top_p,
                           "max_new_tokens": max_new_tokens})
        return [self.answer(chat) for chat in chats]


@pytest.fixture
def script(monkeypatch):
    def install(module, answer) -> Scripted:
        fake = Scripted(answer)
        for target in (module, common):  # perturb, densify and questions write through common.write_texts
            if hasattr(target, "generate_text"):
                monkeypatch.setattr(target, "generate_text", fake)
        return fake

    return install


def by_run(answers: dict[str, list[str]]):
    """Answer each run's draws in order, the run told apart by its system prompt."""
    queues = {prompt_template(key).system: iter(texts) for key, texts in answers.items()}
    return lambda chat: next(queues[chat[0]["content"]])


def answer_line(prompt: str, relation: str = "(x, y)") -> str:
    return f"Prompt: {prompt}; Concepts and relations: {prompt}; Relation: {relation}"


def prompts_table(items: list[dict]) -> pa.Table:
    """A PROMPTS table of accepted items, structured columns read from each item's relation text."""
    rows = [{**item, "concepts": "", "source": "model", "ok": True, **parse_relation(item["relation"]).columns()}
            for item in items]
    return to_table(rows, PROMPTS)


ITEMS = [
    {"item_id": "0000000", "t2i_category": "attribute", "sub_category": "attribute2",
     "prompt": "a red cup and a blue lamp", "relation": "(cup, red), (lamp, blue)"},
    {"item_id": "0000001", "t2i_category": "attribute", "sub_category": "attribute1_color",
     "prompt": "a green cup", "relation": "(cup, green)"},
    {"item_id": "1000000", "t2i_category": "layout", "sub_category": "layout1",
     "prompt": "a cat behind a dog", "relation": "(cat, behind, dog)"},
    {"item_id": "1000001", "t2i_category": "layout", "sub_category": "layout3",
     "prompt": "two cats and three dogs", "relation": "(cats, two), (dogs, three)"},
]


# --- stage 1 ----------------------------------------------------------------------------------------------------


def test_prompts_rules_quotas_and_item_ids(script):
    fake = script(prompts_module, by_run({
        "color1": [answer_line("a red cat"), answer_line("a red cat"), "garbage", answer_line("a red-brown cat"),
                   "Prompt: ; C: c; R: r", answer_line("a blue dog", "(dog, blue)"),
                   answer_line("a green cow"), answer_line("a pink pig")],
        "2D_spatial": ["nonsense", "more nonsense", "Prompt: a; b"],
        "complex": [answer_line("a (fluffy) cat - on a mat", "(cat, fluffy)"), answer_line("a dog on a log"),
                    "x;y", answer_line("a fox")],
    }))
    cfg = PromptsConfig(**only({"color1": 3, "2D_spatial": 1, "complex": 2}), repeat=4,
                        max_draws_per_item=3, max_new_tokens=7)
    table = generate_prompts(tools_for(None), cfg)
    rows = table.to_pylist()
    assert [(r["sub_category"], r["item_id"], r["reason"]) for r in rows] == [
        ("attribute1_color", "0000000", None),
        ("attribute1_color", None, "duplicate"),
        ("attribute1_color", None, "bad_format"),
        ("attribute1_color", None, "forbidden_substring"),
        ("attribute1_color", None, "empty"),
        ("attribute1_color", "0000001", None),
        ("attribute1_color", "0000002", None),
        ("attribute1_color", None, "over_quota"),  # the rest of the step that filled the quota
        ("layout1", None, "bad_format"),  # 3 draws (quota 1 x 3) and the run gives up, short
        ("layout1", None, "bad_format"),
        ("layout1", None, "bad_format"),
        ("complex", "3000000", None),  # the stop substrings do not apply to complex
        ("complex", "3000001", None),
        ("complex", None, "bad_format"),
        ("complex", None, "over_quota"),
    ]
    assert all(r["raw_output"] is not None and r["source"] == "model" for r in rows)
    assert rows[5]["objects"] == ["dog"] and rows[5]["attributes"] == [{"object": "dog", "attribute": "blue"}]
    # Two generate calls for color1 (4 draws each), one of 3 for 2D_spatial, one of 4 for complex.
    assert [len(c["chats"]) for c in fake.calls] == [4, 4, 3, 4]
    assert fake.calls[0]["seed"] == [row_seed(42, "color1", j) for j in range(4)]
    assert fake.calls[1]["seed"] == [row_seed(42, "color1", j) for j in range(4, 8)]
    assert {c["max_new_tokens"] for c in fake.calls} == {7}


def test_prompts_structured_fallback_fills_the_shortfall(script):
    script(prompts_module, lambda chat: "nonsense")
    cfg = PromptsConfig(**only({"color2": 2, "numeracy2": 1}), max_draws_per_item=1,
                        fallback="structured")
    rows = generate_prompts(tools_for(None), cfg).to_pylist()
    assert [(r["source"], r["ok"], r["item_id"]) for r in rows] == [
        ("model", False, None), ("model", False, None), ("fallback", True, "0000000"), ("fallback", True, "0000001"),
        ("model", False, None), ("fallback", True, "1000000"),
    ]
    color2, numeracy2 = rows[2], rows[5]
    assert color2["raw_output"] is None  # a fallback never pretends to be model output
    assert len(color2["attributes"]) == 2 and " and " in color2["prompt"]
    assert len(numeracy2["counts"]) == 2 and numeracy2["sub_category"] == "layout3"


def test_fallback_grammar_writes_valid_distinct_prompts():
    words, rng = vocabulary(), random.Random(0)
    for key in SUB_CATEGORIES:
        answers = [fallback_prompt(key, rng, words) for _ in range(30)]
        assert len({a.prompt for a in answers}) > 10, key
        for answer in answers:
            assert forbidden_substring(answer.prompt) is None, answer
            structure = parse_relation(answer.relation)
            assert structure.objects and all(o in answer.prompt for o in structure.objects), answer


def test_prompts_rotation_redraws_shots_from_accepted_prompts(script):
    counter = iter(range(100))
    fake = script(prompts_module, lambda chat: answer_line(f"a cat number {next(counter)}"))
    cfg = PromptsConfig(**only({"color1": 5}), repeat=1, rotation_interval=2)
    rows = generate_prompts(tools_for(None), cfg).to_pylist()
    assert [r["item_id"] for r in rows] == [f"000000{i}" for i in range(5)]
    # Steps 0-1 and 2-3 use the template's shots (3 accepted are needed to rotate: none at step 2), step 4 rotates.
    assert [len(c["chats"]) for c in fake.calls] == [2, 2, 1]
    template = prompt_template("color1")
    assert fake.calls[0]["chats"][0] == fake.calls[1]["chats"][0] == template.chat()
    rotated = fake.calls[2]["chats"][0]
    assert rotated[0] == template.chat()[0] and rotated[-1] == template.chat()[-1]
    shots = [m["content"] for m in rotated if m["role"] == "assistant"]
    accepted = [answer_line(r["prompt"]) for r in rows[:4]]
    assert len(shots) == 3 == len(set(shots)) and set(shots) <= set(accepted)


# --- stage 2a ---------------------------------------------------------------------------------------------------


def negative_answers(chat) -> str:
    prompt, instruction = chat[-1]["content"].split("\n", 1)
    method = instruction.split("<", 1)[1].split(">", 1)[0]
    return {
        ("a red cup and a blue lamp", "replace"): "Step 4. Contrastive Prompt: a green cup and a blue lamp",
        ("a red cup and a blue lamp", "swap"): "Step 4. a blue cup and a red lamp",  # no marker
        ("a red cup and a blue lamp", "drop"): "Step 4. Contrastive Prompt: A red cup and a blue lamp.",  # echo
        ("a cat behind a dog", "replace"): "Step 4. Contrastive Prompt: a cat <pos>under<pos> a dog\nStep 5. junk",
        ("a cat behind a dog", "swap"): "Step 4. Contrastive Prompt: <|User|>: a dog",
        ("a cat behind a dog", "drop"): "Step 4. Contrastive Prompt: a cat and a dog",
        ("a green cup", "replace"): "Step 4. Contrastive Prompt:",
    }.get((prompt, method), "nonsense")


def test_perturb_assignment_seeds_and_reasons(script):
    fake = script(perturb_module, negative_answers)
    junk = to_table([{"t2i_category": "layout", "sub_category": "layout1", "prompt": "junk", "ok": False,
                      "reason": "bad_format"}], PROMPTS)
    prompts = pa.concat_tables([prompts_table(ITEMS), junk])
    cfg = PerturbConfig(max_new_tokens=9)
    table = perturb(prompts, tools_for(None), cfg)
    rows = table.to_pylist()
    assert len(rows) == 4 * 3  # ok items x k; the rejected prompt row is not an item
    for row in rows:
        assert row["perturbation"] == perturbations_for(row["sub_category"])[row["k"]]
        assert row["seed"] == row_seed(cfg.seeds[row["k"]], row["item_id"])
    assert fake.calls[0]["seed"] == [r["seed"] for r in rows]
    assert (fake.calls[0]["temperature"], fake.calls[0]["top_p"]) == (1.2, 0.9)
    got = {(r["item_id"], r["k"]): (r["negative_prompt"], r["reason"]) for r in rows}
    assert got[("0000000", 0)] == ("a green cup and a blue lamp", None)
    assert got[("0000000", 1)] == (None, "no_marker")
    assert got[("0000000", 2)] == (None, "echo")
    assert got[("1000000", 0)] == ("a cat under a dog", None)
    assert got[("1000000", 1)] == (None, "role_token")
    assert got[("1000000", 2)] == ("a cat and a dog", None)
    assert got[("0000001", 0)] == (None, "empty")
    # "a green cup" gets the same (empty) answer for its three replace chats.
    assert Counter(r["reason"] for r in rows) == {None: 3, "no_marker": 4, "echo": 1, "role_token": 1, "empty": 3}
    assert all(r["raw_output"] and r["source"] == "model" for r in rows)


def test_perturb_structured_fallback(script):
    script(perturb_module, negative_answers)
    rows = perturb(prompts_table(ITEMS), tools_for(None), PerturbConfig(fallback="structured")).to_pylist()
    got = {(r["item_id"], r["k"]): r for r in rows}
    assert got[("0000000", 0)]["source"] == "model"
    assert got[("0000000", 1)]["negative_prompt"] == "a blue cup and a red lamp"  # swap the two attributes
    assert got[("0000000", 2)]["negative_prompt"] in {"a red cup", "a blue lamp"}  # drop one object
    assert got[("1000000", 1)]["negative_prompt"] == "a dog behind a cat"  # swap a relation's objects
    assert got[("1000001", 1)]["negative_prompt"] == "three cats and two dogs"  # swap numbers
    assert got[("1000001", 2)]["negative_prompt"] in {"two cats", "three dogs"}
    # replace: exactly one of the two number words changes
    replaced = got[("1000001", 0)]["negative_prompt"].split()
    assert sum(a != b for a, b in zip(replaced, "two cats and three dogs".split())) == 1 and len(replaced) == 5
    # attribute1_color has no other color this round: the replacement comes from the whole round's attributes.
    assert {got[("0000001", k)]["negative_prompt"] for k in range(3)} <= {"a red cup", "a blue cup"}
    for r in rows:
        assert r["ok"] and r["reason"] is None and r["raw_output"]  # the model's real answer is kept
        assert (r["source"] == "model") == ((r["item_id"], r["k"]) in {("0000000", 0), ("1000000", 0),
                                                                       ("1000000", 2)})


def test_perturb_fallback_that_finds_nothing_leaves_the_row_failed(script):
    script(perturb_module, lambda chat: "nonsense")
    single = [{"item_id": "0000000", "t2i_category": "attribute", "sub_category": "attribute2",
               "prompt": "a cup and a lamp", "relation": ""}]
    rows = perturb(prompts_table(single), tools_for(None), PerturbConfig(fallback="structured")).to_pylist()
    assert [(r["ok"], r["reason"], r["source"]) for r in rows] == [(False, "no_marker", "model")] * 3


def test_stages_name_a_missing_input_column():
    prompts = prompts_table(ITEMS)
    with pytest.raises(ValueError, match="no column 'prompt'"):
        perturb(prompts.drop_columns(["prompt"]), tools_for(None), PerturbConfig())
    with pytest.raises(ValueError, match="no column 'attributes'"):
        perturb(prompts.drop_columns(["attributes"]), tools_for(None), PerturbConfig(fallback="structured"))
    nulled = prompts.set_column(prompts.schema.get_field_index("prompt"), "prompt", pa.array([None] * 4, pa.string()))
    with pytest.raises(ValueError, match="null 'prompt'.*mark that row ok=False"):
        perturb(nulled, tools_for(None), PerturbConfig())
    negatives = to_table([], NEGATIVES)
    with pytest.raises(ValueError, match="no column 'negative_prompt'"):
        densify(negatives.drop_columns(["negative_prompt"]), tools_for(None), DensifyConfig())
    with pytest.raises(ValueError, match="no column 'k'"):
        generate_questions(prompts, negatives.drop_columns(["k"]), tools_for(None), QuestionsConfig())


# --- stage 2b ---------------------------------------------------------------------------------------------------


def negatives_table(pairs: list[tuple[dict, int, str | None]]) -> pa.Table:
    rows = [{**{c: item[c] for c in ("item_id", "t2i_category", "sub_category", "prompt")}, "k": k,
             "perturbation": perturbations_for(item["sub_category"])[k], "negative_prompt": negative,
             "source": "model", "ok": negative is not None, "reason": None if negative else "no_marker"}
            for item, k, negative in pairs]
    return to_table(rows, NEGATIVES)


NEGATIVE_PAIRS = [
    (ITEMS[0], 0, "a green cup and a blue lamp"),
    (ITEMS[0], 1, None),
    (ITEMS[2], 1, "a dog behind a cat"),
    (ITEMS[3], 1, "three cats and two dogs"),
]


def test_densify_parses_both_dense_prompts_or_fails_both(script):
    def answer(chat):
        if "green cup" in chat[-1]["content"]:
            return "Step 2. Prompt 1 Dense: A red cup, lit.\nStep 4. Prompt 2 Dense: A green cup, lit."
        return "Step 2. Prompt 1 Dense: A cat in a garden."  # no Step 4 line

    fake = script(densify_module, answer)
    negatives = negatives_table(NEGATIVE_PAIRS)
    rows = densify(negatives, tools_for(None), DensifyConfig()).to_pylist()
    assert len(rows) == 3  # one per ok negative
    assert [(r["dense_prompt"], r["negative_dense_prompt"], r["reason"]) for r in rows] == [
        ("A red cup, lit.", "A green cup, lit.", None),
        (None, None, "no_negative_dense_prompt"),
        (None, None, "no_negative_dense_prompt"),
    ]
    assert fake.calls[0]["seed"] == [row_seed(s, i) for s, i in ((0, "0000000"), (1, "1000000"), (1, "1000001"))]
    assert fake.calls[0]["chats"][0][-1]["content"].startswith(
        "Prompt 1: a red cup and a blue lamp\nPrompt 2: a green cup and a blue lamp\n")

    fallback = densify(negatives, tools_for(None), DensifyConfig(fallback="structured")).to_pylist()
    assert [(r["dense_prompt"], r["negative_dense_prompt"], r["source"], r["ok"]) for r in fallback[1:]] == [
        ("a cat behind a dog", "a dog behind a cat", "fallback", True),
        ("two cats and three dogs", "three cats and two dogs", "fallback", True),
    ]
    assert fallback[1]["raw_output"] == "Step 2. Prompt 1 Dense: A cat in a garden."


# --- stage 3a ---------------------------------------------------------------------------------------------------


def test_questions_for_base_and_negative_prompts(script):
    def answer(chat):
        if chat[-1]["content"] == "a red cup and a blue lamp":
            return "Concepts and relations: red cup, blue lamp; Questions: Is there a red cup? Is there a blue lamp?."
        return "nonsense"

    fake = script(questions_module, answer)
    prompts, negatives = prompts_table(ITEMS), negatives_table(NEGATIVE_PAIRS)
    rows = generate_questions(prompts, negatives, tools_for(None), QuestionsConfig()).to_pylist()
    assert [(r["item_id"], r["side"], r["k"], r["ok"], r["reason"]) for r in rows] == [
        ("0000000", "base", -1, True, None),
        ("0000001", "base", -1, False, "no_marker"),
        ("1000000", "base", -1, False, "no_marker"),
        ("1000001", "base", -1, False, "no_marker"),
        ("0000000", "negative", 0, False, "no_marker"),
        ("1000000", "negative", 1, False, "no_marker"),
        ("1000001", "negative", 1, False, "no_marker"),
    ]
    assert rows[0]["questions"] == ["Is there a red cup?", "Is there a blue lamp?"]
    assert fake.calls[0]["seed"] == [row_seed(42, r["item_id"], r["k"]) for r in rows]
    assert (fake.calls[0]["temperature"], fake.calls[0]["top_p"], fake.calls[0]["max_new_tokens"]) == (1.2, 0.5, 256)

    fallback = generate_questions(prompts, negatives, tools_for(None), QuestionsConfig(fallback="structured")).to_pylist()
    got = {(r["item_id"], r["side"], r["k"]): r["questions"] for r in fallback}
    assert got[("0000001", "base", -1)] == ["Is there a green cup?"]
    assert got[("1000000", "base", -1)] == ["Is there a cat?", "Is there a dog?", "Is the cat behind the dog?"]
    assert got[("1000001", "base", -1)] == ["Are there two cats?", "Are there three dogs?"]
    # A negative prompt's tuples are read back from its text with the round's words.
    assert got[("0000000", "negative", 0)] == ["Is there a green cup?", "Is there a blue lamp?"]
    assert got[("1000000", "negative", 1)] == ["Is there a dog?", "Is there a cat?", "Is the dog behind the cat?"]
    assert got[("1000001", "negative", 1)] == ["Are there three cats?", "Are there two dogs?"]
    assert [r["source"] for r in fallback] == ["model"] + ["fallback"] * 6
    assert all(r["ok"] for r in fallback)


# --- the tiny model, end to end --------------------------------------------------------------------------------

SMALL = {"max_new_tokens": 16, "batch_size": 8}


def assert_accounted(table: pa.Table, schema: pa.Schema, rows_in: int):
    """Rows in = rows out; each row is ok or carries a known reason code, and keeps the raw model output."""
    assert table.schema.equals(schema) and table.num_rows == rows_in
    for row in table.to_pylist():
        assert row["ok"] == (row["reason"] is None)
        assert row["ok"] or row["reason"] in REASONS, row["reason"]
        assert row["source"] in {"model", "fallback"}


def test_tiny_model_prompts_without_fallback(tiny):
    cfg = PromptsConfig(max_len=1, max_draws_per_item=2, **SMALL)
    table = generate_prompts(tools_for(tiny), cfg)
    assert_accounted(table, PROMPTS, 12 * 2)  # every draw is a row, whether it parsed or not
    rows = table.to_pylist()
    assert all(r["raw_output"] is not None and r["source"] == "model" for r in rows)
    assert all((r["item_id"] is not None) == r["ok"] for r in rows)


def test_tiny_model_later_stages_without_fallback(tiny):
    prompts, negatives = prompts_table(ITEMS), negatives_table(NEGATIVE_PAIRS)
    negative_rows = perturb(prompts, tools_for(tiny), PerturbConfig(**SMALL))
    assert_accounted(negative_rows, NEGATIVES, 4 * 3)
    # Per-row seeds: the same table whatever the batch size.
    assert perturb(prompts, tools_for(tiny), PerturbConfig(max_new_tokens=16, batch_size=5)).equals(negative_rows)
    assert_accounted(densify(negatives, tools_for(tiny), DensifyConfig(**SMALL)), DENSE, 3)
    assert_accounted(generate_questions(prompts, negatives, tools_for(tiny), QuestionsConfig(**SMALL)), QUESTIONS, 4 + 3)


def test_tiny_model_round_with_structured_fallback(tiny):
    quotas = {"color2": 1, "2D_spatial": 1, "numeracy2": 1, "complex": 1}
    prompts = generate_prompts(tools_for(tiny), PromptsConfig(**only(quotas), max_draws_per_item=1, fallback="structured",
                                                   **SMALL))
    items = prompts.filter(prompts.column("ok"))
    assert items.num_rows == 4
    assert sorted(items.column("item_id").to_pylist()) == ["0000000", "1000000", "1000001", "3000000"]

    negatives = perturb(prompts, tools_for(tiny), PerturbConfig(fallback="structured", **SMALL))
    assert_accounted(negatives, NEGATIVES, 4 * 3)
    ok_negatives = negatives.filter(negatives.column("ok"))
    assert ok_negatives.num_rows >= 8  # every drop and swap has a structure to work on; a replace may not
    for row in ok_negatives.to_pylist():
        assert row["negative_prompt"] and row["negative_prompt"] != row["prompt"]
        assert row["raw_output"] is not None  # what the model really said stays beside the fallback

    dense = densify(negatives, tools_for(tiny), DensifyConfig(fallback="structured", **SMALL))
    assert_accounted(dense, DENSE, ok_negatives.num_rows)
    assert all(r["ok"] and r["dense_prompt"] for r in dense.to_pylist())

    questions = generate_questions(prompts, negatives, tools_for(tiny), QuestionsConfig(fallback="structured", **SMALL))
    assert_accounted(questions, QUESTIONS, 4 + ok_negatives.num_rows)
    ok_questions = [r for r in questions.to_pylist() if r["ok"]]
    assert len(ok_questions) >= 4 + ok_negatives.num_rows - 2
    assert all(q.endswith("?") for r in ok_questions for q in r["questions"])
