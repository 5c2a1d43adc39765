"""Stage 1: initial prompt generation (spec section 1).

Each of the twelve sub-category runs asks the model, through its few-shot chat, for one prompt in the form
`Prompt: ...; Concepts and relations: ...; Relation: ...`, `repeat` times per step, until the run's quota of accepted
prompts is met or it has spent its draw budget. A draw is accepted when it parses (3 parts on ';'), is non-empty,
has none of the stop substrings (attribute and layout runs only) and is not an exact duplicate. Every
`rotation_interval` steps the shots are redrawn from the prompts accepted so far. Accepted prompts are numbered with
the spec's 7-character item ids; rejected draws stay in the table with their reason and raw output.

Seeds: draw j of run `key` uses row_seed(cfg.seed, key, j) and the rotation at step s uses
row_seed(cfg.seed, key, "rotation", s), so the table does not depend on `batch_size` or on how draws are batched.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter

import pyarrow as pa

from ospo_core.config import PromptsConfig
from ospo_core.janus.text import generate_text
from ospo_core.records import PROMPTS, to_table
from ospo_core.stages.common import row_seed
from ospo_core.templates import (
    CATEGORY_PREFIX,
    SUB_CATEGORIES,
    PromptTemplate,
    item_id,
    prompt_template,
    vocabulary,
    with_article,
)
from ospo_core.templates.parse import (
    ParseError,
    PromptAnswer,
    forbidden_substring,
    number_value,
    parse_prompt_answer,
    parse_relation,
)

log = logging.getLogger("ospo.stages.prompts")

# The fallback grammar's attribute word lists per run family, and its relation lists per spatial run.
_ATTRIBUTE_WORDS = {"color": "colors", "shape": "shapes", "texture": "textures"}
_SPATIAL_WORDS = {"2D_spatial": "relations_2d", "3D_spatial": "relations_3d"}
# Draws of the fallback grammar allowed per missing prompt before a shortfall is accepted (small vocabularies).
_FALLBACK_TRIES = 50


def generate_prompts(tools, cfg: PromptsConfig) -> pa.Table:
    """The PROMPTS table of the round, written by `tools.writer`."""
    return tools.writer.prompts(cfg)


def write_prompts(bundle, cfg: PromptsConfig) -> pa.Table:
    """The paper's writer: all twelve runs (those with a non-zero quota), as one PROMPTS table: accepted prompts
    carry item ids."""
    rows: list[dict] = []
    wanted = sum(cfg.quota_for(key) for key in SUB_CATEGORIES)
    for key in SUB_CATEGORIES:
        quota = cfg.quota_for(key)
        if quota:
            done = sum(row["ok"] for row in rows)
            rows += _run(bundle, cfg, prompt_template(key), quota, (done, wanted))
    counters = dict.fromkeys(CATEGORY_PREFIX, 0)
    for row in rows:  # runs come in the spec's fixed order, so this numbers each category across its runs
        if row["ok"]:
            row["item_id"] = item_id(row["t2i_category"], counters[row["t2i_category"]])
            counters[row["t2i_category"]] += 1
    return to_table(rows, PROMPTS)


def _run(bundle, cfg: PromptsConfig, template: PromptTemplate, quota: int, progress: tuple[int, int]) -> list[dict]:
    """One sub-category's run; `progress` = (prompts accepted by the runs before it, prompts wanted in all)."""
    rows: list[dict] = []
    accepted: list[PromptAnswer] = []
    shots: tuple[PromptAnswer, ...] | None = None  # the template's own shots until the first rotation
    max_draws = math.ceil(quota * cfg.max_draws_per_item)
    step = draws = 0
    while len(accepted) < quota and draws < max_draws:
        if step and step % cfg.rotation_interval == 0 and len(accepted) >= template.rotation_shots:
            rng = random.Random(row_seed(cfg.seed, template.key, "rotation", step))
            shots = tuple(rng.sample(accepted, template.rotation_shots))
        # Several steps can share one generate call up to the next rotation, but never more than the quota could
        # still use if every draw were accepted: the quota can then only fill in the call's last step, so the
        # table is the same as drawing step by step.
        steps_to_rotation = cfg.rotation_interval - step % cfg.rotation_interval
        steps = min(steps_to_rotation, math.ceil((quota - len(accepted)) / cfg.repeat))
        n = min(steps * cfg.repeat, max_draws - draws)
        outputs = generate_text(
            bundle,
            [template.chat(shots)] * n,
            seed=[row_seed(cfg.seed, template.key, draws + j) for j in range(n)],
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
        )
        seen = {a.prompt for a in accepted}
        for text in outputs:
            row = _judge(text, template)
            if row["ok"] and row["prompt"] in seen:
                row.update(ok=False, reason="duplicate")
            elif row["ok"] and len(accepted) >= quota:
                row.update(ok=False, reason="over_quota")  # the rest of the step that filled the quota
            if row["ok"]:
                accepted.append(PromptAnswer(row["prompt"], row["concepts"], row["relation"]))
                seen.add(row["prompt"])
            rows.append(row)
        draws += n
        step += steps
        log.info("prompts %s: %d/%d accepted of %d drawn", template.key, len(accepted), quota, draws,
                 extra={"progress": (progress[0] + len(accepted), progress[1])})
    if cfg.fallback == "structured" and len(accepted) < quota:
        rows += _fallback_rows(cfg, template, quota - len(accepted), {a.prompt for a in accepted})
    return rows


def prompt_shortfall(prompts: pa.Table, cfg: PromptsConfig) -> dict[str, dict[str, int]]:
    """Sub-categories (the table's, e.g. attribute2 = color2 + shape2 + texture2) that ended below their quota:
    {sub_category: {"wanted", "accepted", "missing"}}. A run stops after ceil(quota x max_draws_per_item) draws
    (the spec draws until the quota is met), so a model that often breaks the format falls short; empty = none."""
    wanted: Counter = Counter()
    for key, (_, sub) in SUB_CATEGORIES.items():
        wanted[sub] += cfg.quota_for(key)
    accepted = Counter(prompts.filter(prompts.column("ok")).column("sub_category").to_pylist())
    return {sub: {"wanted": n, "accepted": accepted[sub], "missing": n - accepted[sub]}
            for sub, n in wanted.items() if accepted[sub] < n}


def _judge(text: str, template: PromptTemplate) -> dict:
    """One draw -> a row, ok unless it fails the spec's parsing or stop-substring rules (dedup is the caller's)."""
    row = {"t2i_category": template.t2i_category, "sub_category": template.sub_category, "raw_output": text,
           "source": "model"}
    try:
        answer = parse_prompt_answer(text)
    except ParseError as error:
        return {**row, "ok": False, "reason": error.reason}
    row.update(_answer_columns(answer))
    if template.filtered and forbidden_substring(answer.prompt):
        return {**row, "ok": False, "reason": "forbidden_substring"}
    return {**row, "ok": True}


def _answer_columns(answer: PromptAnswer) -> dict:
    return {"prompt": answer.prompt, "concepts": answer.concepts, "relation": answer.relation,
            **parse_relation(answer.relation).columns()}


def _fallback_rows(cfg: PromptsConfig, template: PromptTemplate, missing: int, seen: set[str]) -> list[dict]:
    """fallback=structured: the shortfall of a run, written by the built-in grammar (source='fallback')."""
    rng = random.Random(row_seed(cfg.seed, template.key, "fallback"))
    words = vocabulary()
    rows = []
    for _ in range(missing * _FALLBACK_TRIES):
        if len(rows) == missing:
            break
        answer = fallback_prompt(template.key, rng, words)
        if answer.prompt not in seen:
            seen.add(answer.prompt)
            rows.append({"t2i_category": template.t2i_category, "sub_category": template.sub_category,
                         **_answer_columns(answer), "raw_output": None, "source": "fallback", "ok": True})
    return rows


def fallback_prompt(key: str, rng: random.Random, words: dict) -> PromptAnswer:
    """One prompt of run `key` from the built-in vocabulary, with the concepts and relation tuples it is built from.

    color1 -> "a red cup" (cup, red); color2 -> "a red cup and a blue lamp"; 2D_spatial -> "a cup on top of a lamp"
    (cup, on top of, lamp); numeracy2 -> "two cups and one lamp" (cups, two), (lamp, one); non-spatial ->
    "a chef holding a cup" (chef, holding, cup); complex -> "a red cup behind a wooden lamp".
    """
    (first, firsts), (second, seconds) = rng.sample(words["objects"], 2)
    attributes: list[tuple[str, str]] = []
    counts: list[tuple[str, str]] = []
    relations: list[tuple[str, str, str]] = []
    if key[:-1] in _ATTRIBUTE_WORDS:
        nouns = [first, second][: int(key[-1])]
        attributes = [(noun, rng.choice(words[_ATTRIBUTE_WORDS[key[:-1]]])) for noun in nouns]
        prompt = " and ".join(with_article(f"{a} {o}") for o, a in attributes)
    elif key in _SPATIAL_WORDS:
        relations = [(first, rng.choice(words[_SPATIAL_WORDS[key]]), second)]
        prompt = f"{with_article(first)} {relations[0][1]} {with_article(second)}"
    elif key.startswith("numeracy"):
        for singular, plural in [(first, firsts), (second, seconds)][: int(key[-1])]:
            number = rng.choice(words["numbers"])
            counts.append((singular if number_value(number) == 1 else plural, number))
        prompt = " and ".join(f"{number} {noun}" for noun, number in counts)
    elif key == "non-spatial":
        relations = [(rng.choice(words["people"]), rng.choice(words["actions"]), first)]
        prompt = f"{with_article(relations[0][0])} {relations[0][1]} {with_article(first)}"
    elif key == "complex":
        attributes = [(first, rng.choice(words["colors"])), (second, rng.choice(words["textures"]))]
        predicate = rng.choice(words["relations_2d"] + words["relations_3d"])
        subject, obj = (f"{a} {o}" for o, a in attributes)
        relations = [(subject, predicate, obj)]
        prompt = f"{with_article(subject)} {predicate} {with_article(obj)}"
    else:
        raise ValueError(f"no fallback grammar for run {key!r}; expected one of {list(SUB_CATEGORIES)}")
    concepts = [f"{a} {o}" for o, a in attributes] + [f"{n} {o}" for o, n in counts] + [" ".join(r) for r in relations]
    tuples = [f"({o}, {a})" for o, a in attributes] + [f"({o}, {n})" for o, n in counts]
    tuples += [f"({s}, {p}, {o})" for s, p, o in relations]
    return PromptAnswer(prompt, ", ".join(concepts), ", ".join(tuples))
