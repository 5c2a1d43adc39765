"""Parsers and templates of the text stages, on hand-written model outputs and the authors' example records."""

import json
from collections import Counter
from pathlib import Path

import pytest

from ospo_core.config import SPEC_QUOTAS
from ospo_core.templates import (
    FAMILIES,
    PERTURBATIONS,
    SUB_CATEGORIES,
    _data,
    dense_chat,
    format_prompt_answer,
    item_id,
    negative_chat,
    perturbations_for,
    prompt_template,
    question_chat,
)
from ospo_core.templates.parse import (
    ParseError,
    PromptAnswer,
    Structure,
    forbidden_substring,
    number_value,
    parse_dense,
    parse_negative,
    parse_prompt_answer,
    parse_questions,
    parse_relation,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ospo_examples"


def reason_of(fn, *args) -> str:
    with pytest.raises(ParseError) as info:
        fn(*args)
    return info.value.reason


# --- stage 1: prompt answers ------------------------------------------------------------------------------------


def test_v2_step1_records_round_trip_and_pass_the_filter():
    """Spec 8.10: the 5 V2 records, their key order and ids; parsing their one-line form gives (p, c, r) back."""
    records = json.loads((FIXTURES / "v2" / "step1" / "base_prompt.json").read_text())
    assert [list(r) for r in records] == [
        ["item_id", "t2i_category", "sub_category", "prompt", "concepts_and_relations", "relation"]
    ] * 5
    assert [r["item_id"] for r in records] == [item_id("attribute", n) for n in range(5)]
    assert {(r["t2i_category"], r["sub_category"]) for r in records} == {SUB_CATEGORIES["color1"]}
    for r in records:
        text = f"Prompt: {r['prompt']};Concepts and relations: {r['concepts_and_relations']};Relation: {r['relation']}"
        answer = parse_prompt_answer(text)
        assert answer == PromptAnswer(r["prompt"], r["concepts_and_relations"], r["relation"])
        assert forbidden_substring(answer.prompt) is None
        # Our own one-line format (with '; ') reads back the same.
        assert parse_prompt_answer(format_prompt_answer(answer)) == answer
    assert records[0]["prompt"] == "a green fishbowl."  # the trailing '.' is kept


@pytest.mark.parametrize(
    "text",
    [
        "Prompt: a cat; Relation: (cat, red)",  # 2 parts
        "Prompt: a cat; Concepts and relations: cat; Relation: (cat, red); extra",  # 4 parts
        "a red cat",  # no separator at all
        "",
    ],
)
def test_prompt_answer_needs_exactly_three_parts(text):
    assert reason_of(parse_prompt_answer, text) == "bad_format"


def test_prompt_answer_takes_the_text_after_the_last_colon():
    answer = parse_prompt_answer("  Prompt: note: a red cat ;Concepts and relations:red cat;Relation:  (cat, red) \n")
    assert answer == PromptAnswer("a red cat", "red cat", "(cat, red)")


def test_prompt_answer_empty_and_role_tokens():
    assert reason_of(parse_prompt_answer, "Prompt: ; Concepts and relations: x; Relation: (x, y)") == "empty"
    # The model ran on into a new chat turn: the role token hides before the last ':' of the relation part.
    leak = "Prompt: a red cat; Concepts and relations: red cat; Relation: (cat, red)\n\n<|User|>: write another"
    assert reason_of(parse_prompt_answer, leak) == "role_token"
    assert reason_of(parse_prompt_answer, "Prompt: a cat<|Assistant|>; Concepts: c; Relation: r") == "role_token"


def test_prompt_answer_keeps_unicode_and_long_text():
    answer = parse_prompt_answer("Prompt: a café’s crème brûlée; Concepts and relations: crème brûlée; Relation: ()")
    assert answer.prompt == "a café’s crème brûlée"
    long_prompt = "a red cat " * 2000
    assert parse_prompt_answer(f"Prompt: {long_prompt}; C: c; R: r").prompt == long_prompt.strip()


@pytest.mark.parametrize(
    "prompt, hit",
    [
        ("a red-brown cat", "-"),
        ("a cat (red)", "("),
        ("a color of a cat", "color"),
        ("a cat\nand a dog", "\n"),
        ("a cat/dog", "/"),
        ("a Color cat", None),  # case-sensitive, as in the spec
        ("a green fishbowl.", None),
    ],
)
def test_stop_substrings(prompt, hit):
    assert forbidden_substring(prompt) == hit


def test_stop_filter_applies_to_attribute_and_layout_runs_only():
    filtered = {key for key in SUB_CATEGORIES if prompt_template(key).filtered}
    assert filtered == set(SUB_CATEGORIES) - {"non-spatial", "complex"}


def test_relation_tuples_become_structured_columns():
    s = parse_relation("(cat, fluffy white), (fluffy white cat, sat next to, black leather couch)")
    assert s.attributes == (("cat", "fluffy white"),)
    assert s.relations == (("cat", "sat next to", "black leather couch"),)  # described object mapped back
    assert s.objects == ("cat", "black leather couch")
    counts = parse_relation("(apples, three), (2, dogs), (pears, 10), (cat, red)")
    assert counts.counts == (("apples", 3), ("dogs", 2), ("pears", 10))
    assert counts.attributes == (("cat", "red"),)
    junk = parse_relation("(a, b, c, d), (, red), () no tuples (x)")
    assert junk == Structure()
    assert Structure.from_columns(s.columns()) == s


def test_number_words():
    assert [number_value(w) for w in ("one", "Ten", " 7 ", "a", "eleven", "")] == [1, 10, 7, None, None, None]


# --- the item-id rule ------------------------------------------------------------------------------------------


def test_item_id_rule():
    assert item_id("attribute", 667) == "0000667"  # the first color2 prompt at full quota
    assert item_id("layout", 0) == "1000000"
    assert item_id("non-spatial", 12) == "2000012"
    assert item_id("complex", 3999) == "3003999"
    assert all(len(item_id("complex", n)) == 7 for n in (0, 999_999))
    with pytest.raises(ValueError, match="lower the quotas"):
        item_id("complex", 1_000_000)


def test_sub_categories_run_in_the_spec_order():
    assert list(SUB_CATEGORIES) == list(SPEC_QUOTAS)
    assert sum(SPEC_QUOTAS.values()) == 16_002


# --- stage 2a: negatives ----------------------------------------------------------------------------------------


def test_perturbation_table_matches_the_authors_records():
    """Spec 8.4: perturbed_method of all 40 example items equals the assignment table."""
    records = json.loads((FIXTURES / "step2" / "long_prompt.json").read_text())
    assert len(records) == 40
    for r in records:
        assert tuple(r["perturbed_method"]) == perturbations_for(r["sub_category"]), r["item_id"]
    present = Counter(r["sub_category"] for r in records)
    assert present == {"attribute1_color": 2, "attribute1_shape": 2, "attribute1_texture": 2, "attribute2": 4,
                       "layout1": 4, "layout2": 3, "layout3": 3, "non-spatial": 10, "complex": 10}
    assert set(PERTURBATIONS) == set(present)


def test_unknown_sub_category_is_refused():
    with pytest.raises(ValueError, match="unknown sub_category 'layout9'"):
        perturbations_for("layout9")


def test_negative_is_the_first_line_after_the_last_marker():
    text = ("Step 1. Objects: cat\nStep 4. Contrastive Prompt: a red cat\n"
            "Step 4. Contrastive Prompt:   a  <pos>blue<pos> cat  \nsome commentary that follows")
    assert parse_negative(text, "a green cat") == "a blue cat"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Step 1. Objects: cat\nStep 4. Prompt: a blue cat", "no_marker"),
        ("", "no_marker"),
        ("Step 4. Contrastive Prompt:", "empty"),
        ("Step 4. Contrastive Prompt: <pos> </pos>", "empty"),
        ("Step 4. Contrastive Prompt: A  Green Cat.", "echo"),
        ("Step 4. Contrastive Prompt: a blue cat<|User|>: more", "role_token"),
        ("Step 4. Contrastive Prompt: <|Assistant|>", "role_token"),
        ("Step 4. Contrastive Prompt: Step 1. Objects: cat", "template_leak"),
    ],
)
def test_negative_rejects(text, reason):
    assert reason_of(parse_negative, text, "a green cat") == reason


def test_negative_may_start_on_the_next_line():
    assert parse_negative("Contrastive Prompt:   \n a blue cat\n<|User|>: next turn", "a cat") == "a blue cat"


def test_negative_keeps_unicode_and_long_lines():
    assert parse_negative("Contrastive Prompt: un chat bleu à l’école ✓", "a cat") == "un chat bleu à l’école ✓"
    long_line = "a blue cat " * 3000
    assert parse_negative(f"Contrastive Prompt: {long_line}\n" + "junk\n" * 100, "x") == long_line.strip()


# --- stage 2b: dense prompts ------------------------------------------------------------------------------------


def test_dense_reads_the_rest_of_both_lines():
    text = ("Step 1. Prompt 1 Objects: cat\nStep 2. Prompt 1 Dense: A red cat on a sofa.  \n"
            "Step 3. Prompt 2 Objects: cat\nStep 4. Prompt 2 Dense: A blue cat on a sofa.\nStep 5. extra")
    assert parse_dense(text) == ("A red cat on a sofa.", "A blue cat on a sofa.")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Step 2. Prompt 1 Dense: A red cat on a sofa.", "no_negative_dense_prompt"),  # spec 8.11
        ("Step 4. Prompt 2 Dense: A blue cat.", "no_dense_prompt"),
        ("nonsense", "no_dense_prompt"),
        ("", "no_dense_prompt"),
        ("Step 2. Prompt 1 Dense:\nStep 4. Prompt 2 Dense: A blue cat.", "no_dense_prompt"),  # nothing on the line
        ("Step 2. Prompt 1 Dense:    \nStep 4. Prompt 2 Dense: A blue cat.", "empty"),
        ("Step 2. Prompt 1 Dense: Step 1. Prompt 1 Objects\nStep 4. Prompt 2 Dense: A blue cat.", "template_leak"),
        ("Step 2. Prompt 1 Dense: A cat.\nStep 4. Prompt 2 Dense: A dog <|User|>: hi", "role_token"),
    ],
)
def test_dense_rejects(text, reason):
    assert reason_of(parse_dense, text) == reason


# --- stage 3a: questions ----------------------------------------------------------------------------------------


def test_questions_spec_example():
    """Spec 8.11: the trailing '.' chunk is dropped."""
    text = "Concepts and relations: cat, dog; Questions: Is there a cat? Is there a dog?."
    assert parse_questions(text) == ["Is there a cat?", "Is there a dog?"]


def test_questions_after_the_last_marker_deduplicated_in_order():
    text = ("Questions: Is there a fox?\nConcepts and relations: x; Questions:  Is the sky blue?Is there a cat ? "
            "Is the sky blue? Is there a cat? ... <|User|>: Is it leaking? Is there a dog")
    # "Is there a cat ?" and "Is there a cat?" are the same question once stripped; the leaking chunk goes.
    assert parse_questions(text) == ["Is the sky blue?", "Is there a cat?", "Is there a dog?"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Concepts and relations: cat; Is there a cat?", "no_marker"),
        ("", "no_marker"),
        ("Questions: ", "no_questions"),
        ("Questions: ?. ? ..?", "no_questions"),
        ("Questions: <|User|>: hello? <|Assistant|>?", "no_questions"),
    ],
)
def test_questions_rejects(text, reason):
    assert reason_of(parse_questions, text) == reason


def test_questions_unicode_and_long():
    assert parse_questions("Questions: Est-ce un café ? Y a-t-il un chat？") == ["Est-ce un café?", "Y a-t-il un chat？?"]
    many = "Questions: " + "".join(f"Is there cat {i}? " for i in range(500))
    assert len(parse_questions(many)) == 500


# --- the template data ------------------------------------------------------------------------------------------


def test_prompt_templates_follow_the_spec_shot_counts_and_parse():
    for key in SUB_CATEGORIES:
        template = prompt_template(key)
        assert len(template.shots) == {"non-spatial": 2, "complex": 4}.get(key, 3), key
        assert template.rotation_shots == (5 if key == "complex" else 3)
        chat = template.chat()
        assert [m["role"] for m in chat] == ["system"] + ["user", "assistant"] * len(template.shots) + ["user"]
        for shot in template.shots:
            assert parse_prompt_answer(format_prompt_answer(shot)) == shot
            assert not (template.filtered and forbidden_substring(shot.prompt)), (key, shot.prompt)
            assert parse_relation(shot.relation).objects, (key, shot.relation)
    assert set(_data("prompts")["sub_categories"]) == set(SUB_CATEGORIES)


def test_negative_templates_cover_the_table_and_their_shots_parse():
    for sub_category, methods in PERTURBATIONS.items():
        for method in methods:
            chat = negative_chat(sub_category, method, "a red cup", seed=1)
            assert chat[-1] == {"role": "user", "content": chat[-1]["content"]}
            assert chat[-1]["content"].startswith("a red cup\n") and f"<{method}>" in chat[-1]["content"]
            for user, answer in zip(chat[1:-1:2], chat[2:-1:2]):
                shot_prompt = user["content"].split("\n", 1)[0]
                assert parse_negative(answer["content"], shot_prompt) != shot_prompt
            assert "{relation}" not in json.dumps(chat)
    with pytest.raises(ValueError, match="no 'swap'"):
        negative_chat("non-spatial", "swap", "a man holding a cup", seed=0)


def test_spatial_replace_names_a_relation_from_the_spec_list():
    relations = _data("negatives")["spatial_replace_relations"]
    named = {next(r for r in relations if f"'{r}'" in negative_chat("layout1", "replace", "a cat behind a dog",
                                                                      seed=s)[-1]["content"]) for s in range(40)}
    assert len(named) > 1 and named <= set(relations)


def test_dense_and_question_templates_parse():
    for sub_category, family in FAMILIES.items():
        chat = dense_chat(sub_category, "a red cup", "a blue cup")
        assert chat[-1]["content"].startswith("Prompt 1: a red cup\nPrompt 2: a blue cup\n")
        answers = chat[2:-1:2]
        assert len(answers) == 3, family
        assert all(parse_dense(a["content"]) for a in answers)
    for category, shots in {"attribute": 3, "layout": 3, "non-spatial": 4, "complex": 4}.items():
        chat = question_chat(category, "a red cup")
        assert chat[-1]["content"] == "a red cup"
        assert len(chat[2:-1:2]) == shots
        assert all(parse_questions(a["content"]) for a in chat[2:-1:2])
