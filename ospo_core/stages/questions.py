"""Stage 3a: decompositional questions (spec section 3a).

Questions come from the SHORT prompts: one row for each ok base prompt (side="base", k=-1) and one for each ok
negative prompt (side="negative", k). The answer is split into questions after the last `Questions: `
(`templates.parse.parse_questions`); a row whose list comes out empty fails with "no_questions". Row (item, k) is
sampled with seed row_seed(cfg.seed, item_id, k).

fallback="structured" writes the questions of a failed row from relation tuples instead (source="fallback"):
"Is there a red apple?", "Are there three cats?", "Is the cat behind the dog?", plus "Is there a dog?" for an object
with no attribute or count. A base prompt uses its own structured columns; a negative prompt has none, so its tuples
are read back from its text with the words of its item and of the round (objects, attributes, relations, numbers).
"""

from __future__ import annotations

import pyarrow as pa

from ospo_core.config import QuestionsConfig
from ospo_core.records import NEGATIVES, PROMPTS, QUESTIONS, to_table
from ospo_core.stages.common import ITEM_COLUMNS, ok_input_rows, row_seed, write_texts
from ospo_core.templates import question_chat, with_article
from ospo_core.templates.parse import ParseError, Structure, number_value, number_word, parse_questions, word_pattern

STRUCTURED_COLUMNS = ["objects", "attributes", "relations", "counts"]


def generate_questions(prompts: pa.Table, negatives: pa.Table, tools, cfg: QuestionsConfig, *,
                       whole: dict[str, pa.Table] | None = None) -> pa.Table:
    """PROMPTS and NEGATIVES (their ok rows) -> QUESTIONS, one row per (item, side, k), written by `tools.writer`.

    `whole`: the round's whole input tables when `prompts`/`negatives` are slices (a stage spread over workers);
    the structured fallback reads a negative with the words of the whole round, so slices give the rows the whole
    tables would.
    """
    structured = cfg.fallback == "structured"
    items = ok_input_rows(prompts, PROMPTS, [*ITEM_COLUMNS, "prompt", *(STRUCTURED_COLUMNS if structured else [])],
                          table_name="prompts", stage="generate_questions")
    negs = ok_input_rows(negatives, NEGATIVES, [*ITEM_COLUMNS, "k", "negative_prompt"],
                         table_name="negatives", stage="generate_questions")
    jobs = [{**{c: i[c] for c in ITEM_COLUMNS}, "side": "base", "k": -1, "prompt": i["prompt"]} for i in items]
    jobs += [{**{c: n[c] for c in ITEM_COLUMNS}, "side": "negative", "k": n["k"], "prompt": n["negative_prompt"]}
             for n in negs]
    round_items = None
    if structured and whole is not None:
        round_items = ok_input_rows(whole["prompts"], PROMPTS, [*ITEM_COLUMNS, "prompt", *STRUCTURED_COLUMNS],
                                    table_name="prompts", stage="generate_questions")
    return tools.writer.questions(jobs, cfg, items, round_items)


def write_questions(bundle, jobs: list[dict], cfg: QuestionsConfig, items: list[dict],
                    round_items: list[dict] | None) -> pa.Table:
    """The paper's writer: one chat per (item, side, k); with fallback=structured a failed parse gets questions
    from the item's relation tuples (base) or from the negative read with the round's words."""
    structured = cfg.fallback == "structured"
    outputs = write_texts(bundle, [question_chat(job["t2i_category"], job["prompt"]) for job in jobs],
                          [row_seed(cfg.seed, job["item_id"], job["k"]) for job in jobs], cfg, "questions")
    structures = {i["item_id"]: Structure.from_columns(i) for i in items} if structured else {}
    if structured and round_items is not None:
        round_words = _words(Structure.from_columns(i) for i in round_items)
    else:
        round_words = _words(structures.values())  # a negative's words: those of its item and of the round
    rows = []
    for job, text in zip(jobs, outputs):
        row = {**job, "raw_output": text, "source": "model"}
        try:
            row.update(questions=parse_questions(text), ok=True)
        except ParseError as error:
            row.update(ok=False, reason=error.reason)
            if structured:
                if job["side"] == "base":
                    structure = structures[job["item_id"]]
                else:
                    structure = bind_structure(job["prompt"], *round_words)
                questions = questions_from_structure(structure)
                if questions:
                    row.update(questions=questions, source="fallback", ok=True, reason=None)
        rows.append(row)
    return to_table(rows, QUESTIONS)


def _words(structures) -> tuple[list[str], list[str], list[str]]:
    """(objects, attributes, predicates) named by `structures`, first occurrence first."""
    objects, attributes, predicates = {}, {}, {}
    for s in structures:
        objects.update(dict.fromkeys(s.objects))
        attributes.update(dict.fromkeys(a for _, a in s.attributes))
        predicates.update(dict.fromkeys(p for _, p, _ in s.relations))
    return list(objects), list(attributes), list(predicates)


def bind_structure(text: str, objects: list[str], attributes: list[str], predicates: list[str]) -> Structure:
    """Read relation tuples back from a short prompt, given the words it may use.

    Objects are found as whole words; a number word right before an object is its count; known attributes between
    the previous object and this one are its attributes; a known predicate between two consecutive objects relates
    them. "two cats behind a red lamp" -> counts (cats, 2), attributes (lamp, red), relations (cats, behind, lamp).
    """
    def canonical(words: list[str]) -> dict[str, str]:
        return {w.lower(): w for w in words}

    objects_by, attributes_by, predicates_by = canonical(objects), canonical(attributes), canonical(predicates)
    # One alternation per word kind, longest first: "cutting board" wins over "board" at the same position.
    spans = [(m.start(), m.end(), objects_by[m.group(0).lower()])
             for m in word_pattern(objects_by.values()).finditer(text)] if objects else []
    found_attributes, counts, relations = [], [], []
    previous, previous_end = None, 0
    for start, end, obj in spans:
        between = text[previous_end:start]
        words = between.split()
        if words and number_value(words[-1]) is not None:
            counts.append((obj, number_value(words[-1])))
        if attributes:
            found_attributes += [(obj, attributes_by[m.group(0).lower()])
                                 for m in word_pattern(attributes_by.values()).finditer(between)]
        if previous is not None and predicates:
            match = word_pattern(predicates_by.values()).search(between)
            if match:
                relations.append((previous, predicates_by[match.group(0).lower()], obj))
        previous, previous_end = obj, end
    return Structure(
        objects=tuple(dict.fromkeys(obj for _, _, obj in spans)),
        attributes=tuple(found_attributes),
        relations=tuple(relations),
        counts=tuple(counts),
    )


def questions_from_structure(structure: Structure) -> list[str]:
    """One question per object (its count, its attributes, or that it exists), then one per relation."""
    questions = []
    for obj in structure.objects:
        count = next((n for o, n in structure.counts if o == obj), None)
        attributes = [a for o, a in structure.attributes if o == obj]
        if count is not None:
            questions.append(f"Is there one {obj}?" if count == 1 else f"Are there {number_word(count)} {obj}?")
        elif attributes:
            questions += [f"Is there {with_article(f'{a} {obj}')}?" for a in attributes]
        else:
            questions.append(f"Is there {with_article(obj)}?")
    plural = {o for o, n in structure.counts if n != 1}
    questions += [f"{'Are' if s in plural else 'Is'} the {s} {p} the {o}?" for s, p, o in structure.relations]
    return list(dict.fromkeys(questions))
