"""The text stages written by the shapes world's grammar instead of the model (`source: testbed`).

In the testbed the model's job is to draw; what the paper asks it to write (prompts, negatives, dense rewrites,
questions) comes from the world, exactly, so a round tests what the preference optimisation does to the drawing.
The stages (`ospo_core.stages.*`) read and check their input tables and build their jobs as always; with
`source: testbed` they hand the jobs here instead of to the model, and each function returns its stage's table
(records.PROMPTS / NEGATIVES / DENSE / QUESTIONS) with source="testbed":

- prompts: per world category (`world.CATEGORIES`, keys of `PromptsConfig.quotas`), `quota` distinct captions drawn
  from the category's training split, each worded in one of its equivalent ways; never a held-out caption.
- negatives: for index k, the perturbation the spec assigns to the sub_category (`templates.PERTURBATIONS`),
  applied to the caption's description (`World.perturb`) with seed row_seed(cfg.seeds[k], item_id).
- dense: the short captions themselves (the world has nothing more to say about a scene).
- questions: `World.questions` of the base caption and of every negative caption.

A prompt that is not a world caption (a model-written prompt reaching a testbed stage) stays in the table with
ok=False and reason "not_a_world_caption"; a perturbation with nothing to change gets "nothing_to_{method}".
"""

from __future__ import annotations

import random

import pyarrow as pa

from ospo_core.config import PromptsConfig
from ospo_core.records import DENSE, NEGATIVES, PROMPTS, QUESTIONS, to_table
from ospo_core.stages.common import ITEM_COLUMNS, row_seed
from ospo_core.templates import SUB_CATEGORIES, item_id, perturbations_for
from ospo_core.templates.parse import Structure
from ospo_core.testbed.world import CATEGORIES, WORLD, CaptionError, Description, World

SOURCE = "testbed"


def structured_columns(d: Description) -> dict:
    """The PROMPTS columns that describe a caption: concepts, relation tuples, objects, attributes, counts.

    Objects are the shape nouns as the caption writes them (so the masks stage finds them in the prompt).
    """
    nouns = [g.kind.shape + ("s" if g.count > 1 else "") for g in d.groups]
    phrases = [f"{g.kind.colour} {noun}" for g, noun in zip(d.groups, nouns)]
    attributes = [(noun, g.kind.colour) for g, noun in zip(d.groups, nouns)]
    counts = [(noun, g.count) for g, noun in zip(d.groups, nouns)] if d.counted else []
    relations = [(phrases[0], d.relation, phrases[1])] if d.relation else []
    tuples = [f"({o}, {a})" for o, a in attributes] + [f"({o}, {n})" for o, n in counts]
    tuples += [f"({s}, {p}, {o})" for s, p, o in relations]
    structure = Structure(objects=tuple(dict.fromkeys(nouns)), attributes=tuple(attributes),
                          relations=tuple(relations), counts=tuple(counts))
    return {"concepts": ", ".join(phrases + [" ".join(r) for r in relations]), "relation": ", ".join(tuples),
            **structure.columns()}


def testbed_prompts(cfg: PromptsConfig, world: World = WORLD) -> pa.Table:
    """Stage 1 from the grammar: `cfg.quota_for(key)` distinct training captions per world category."""
    unknown = [key for key in cfg.quotas if cfg.quota_for(key) and key not in CATEGORIES]
    if unknown:
        raise ValueError(f"prompts.source=testbed: the shapes world has no captions for {unknown}; set their quotas "
                         f"to 0 (the world covers {list(CATEGORIES)}) or use the 'testbed' preset")
    rows, counters = [], {}
    for key in CATEGORIES:
        quota = cfg.quota_for(key)
        train, _ = world.split(key)
        if quota > len(train):
            raise ValueError(f"prompts.quotas.{key}={quota} exceeds the {len(train)} training captions of that "
                             f"category in the shapes world; lower the quota")
        rng = random.Random(row_seed(cfg.seed, key, SOURCE))
        t2i_category, sub_category = SUB_CATEGORIES[key]
        for d in rng.sample(train, quota):
            d = world.wording(d, rng)
            counter = counters.get(t2i_category, 0)
            counters[t2i_category] = counter + 1
            rows.append({"item_id": item_id(t2i_category, counter), "t2i_category": t2i_category,
                         "sub_category": sub_category, "prompt": world.caption(d), **structured_columns(d),
                         "source": SOURCE, "ok": True})
    return to_table(rows, PROMPTS)


def testbed_negatives(jobs: list[tuple[dict, int, str, int]], world: World = WORLD) -> pa.Table:
    """Stage 2a from the structure: perturb's (item, k, method, seed) jobs -> one negative each."""
    rows = []
    for item, k, method, seed in jobs:
        row = {**{c: item[c] for c in ITEM_COLUMNS}, "k": k, "seed": seed, "perturbation": method,
               "prompt": item["prompt"], "source": SOURCE}
        try:
            negative = world.perturb(world.parse(item["prompt"]), method, random.Random(seed))
        except CaptionError:
            rows.append({**row, "ok": False, "reason": "not_a_world_caption"})
            continue
        if negative is None:
            rows.append({**row, "ok": False, "reason": f"nothing_to_{method}"})
        else:
            rows.append({**row, "negative_prompt": world.caption(negative), "ok": True})
    return to_table(rows, NEGATIVES)


def testbed_dense(pairs: list[dict], seeds: list[int]) -> pa.Table:
    """Stage 2b from densify's checked pairs: the dense prompts are the short captions (they already name every
    object of the scene)."""
    rows = [{**p, "seed": seed, "dense_prompt": p["prompt"], "negative_dense_prompt": p["negative_prompt"],
             "source": SOURCE, "ok": True} for p, seed in zip(pairs, seeds)]
    return to_table(rows, DENSE)


def testbed_questions(jobs: list[dict], world: World = WORLD) -> pa.Table:
    """Stage 3a from the structure: generate_questions' (item, side, k, prompt) jobs -> the world's exact questions
    for each caption."""
    rows = []
    for job in jobs:
        try:
            rows.append({**job, "questions": world.questions(world.parse(job["prompt"])), "source": SOURCE, "ok": True})
        except CaptionError:
            rows.append({**job, "source": SOURCE, "ok": False, "reason": "not_a_world_caption"})
    return to_table(rows, QUESTIONS)
