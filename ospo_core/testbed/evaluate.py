"""Held-out exact-scene metrics of the testbed: does the model draw exactly the scene a caption asks for?

For every category, `samples` scenes are drawn for the category's held-out captions (cycled, each repeat with a new
seed; captions never seen in pre-training nor in any round) and checked against the caption:

- exact-scene accuracy: the grid is a scene of the caption, i.e. every question of `World.questions` is true (each
  kind's exact count, the relation, and nothing else drawn);
- object recall: of the objects the caption names, the fraction drawn (per kind, up to the asked count);
- hallucination rate: of the objects drawn, the fraction the caption did not ask for.

Recall and hallucination are ratios of object totals over the category (micro averages). Sampling uses seeds
row_seed(seed, caption, repeat), so two models evaluated with one seed see the same noise and differ only by weights.
"""

from __future__ import annotations

import random

import pyarrow as pa

from ospo_core.janus.image import sample_image_tokens
from ospo_core.config import RenderConfig, TestbedConfig
from ospo_core.records import TESTBED_EVAL, to_table
from ospo_core.stages.common import row_seed
from ospo_core.testbed.oracle import answers
from ospo_core.testbed.world import CATEGORIES, WORLD, Description, World


def heldout_prompts(world: World, samples: int) -> list[tuple[str, Description, int]]:
    """(category, description, repeat) for `samples` draws per category over its held-out captions, fixed wording."""
    out = []
    for category in CATEGORIES:
        _, heldout = world.split(category)
        rng = random.Random(f"{world.split_seed}:{category}:wording")
        worded = [world.wording(d, rng) for d in heldout]
        out += [(category, worded[j % len(worded)], j // len(worded)) for j in range(samples)]
    return out


def score_scene(world: World, tokens: list[int], d: Description) -> dict:
    """exact / asked / found / drawn for one grid against one description."""
    objects = world.objects(tokens)
    drawn = {}
    for kind, _ in objects:
        drawn[kind] = drawn.get(kind, 0) + 1
    return {
        "exact": all(answers(tokens, world.questions(d), world)),
        "asked": d.objects,
        "found": sum(min(drawn.get(g.kind, 0), g.count) for g in d.groups),
        "drawn": len(objects),
    }


def evaluate_scenes(bundle, render: RenderConfig, *, samples: int, seed: int, world: World = WORLD) -> pa.Table:
    """records.TESTBED_EVAL: one row per drawn scene, `samples` per category, drawn as `render` draws a round's."""
    jobs = [(category, d, world.caption(d), repeat) for category, d, repeat in heldout_prompts(world, samples)]
    seeds = [row_seed(seed, caption, repeat) for _, _, caption, repeat in jobs]
    tokens = sample_image_tokens(bundle, [caption for _, _, caption, _ in jobs], cfg_weight=render.cfg_weight,
                                 temperature=render.temperature, seed=seeds, batch_size=render.batch_size,
                                 compile_mode=render.compile_mode).tolist()
    rows = []
    for (category, d, caption, repeat), s, grid in zip(jobs, seeds, tokens):
        rows.append({"category": category, "prompt": caption, "k": repeat, "seed": s, "image_tokens": grid,
                     **score_scene(world, grid, d)})
    return to_table(rows, TESTBED_EVAL)


def summarize(table: pa.Table) -> dict[str, dict[str, float]]:
    """category (and "all") -> {exact, recall, hallucination, samples}."""
    rows = table.select(["category", "exact", "asked", "found", "drawn"]).to_pylist()
    out = {}
    for category in [*CATEGORIES, "all"]:
        part = [r for r in rows if category in ("all", r["category"])]
        if not part:
            continue
        asked, found, drawn = (sum(r[c] for r in part) for c in ("asked", "found", "drawn"))
        out[category] = {
            "exact": sum(r["exact"] for r in part) / len(part),
            "recall": found / asked,
            "hallucination": (drawn - found) / drawn if drawn else 0.0,
            "samples": len(part),
        }
    return out


def before_after(model: str, adapters: list[str], adapter: str, render: RenderConfig, *,
                 samples: int = TestbedConfig.model_fields["eval_samples"].default, seed: int = 0) -> tuple[dict, dict]:
    """Held-out summaries (`summarize`) of a round's start model (`model` + `adapters`) and of its trained model
    (the same + `adapter`), drawn with the same noise: what one round did to the drawing."""
    from ospo_core.janus.load import load_janus

    start = load_janus(model, adapters=adapters)
    trained = load_janus(model, adapters=[*adapters, adapter])
    return tuple(summarize(evaluate_scenes(b, render, samples=samples, seed=seed)) for b in (start, trained))


def before_after_table(before: dict, after: dict) -> str:
    """Plain-text lines: exact-scene accuracy per category before and after, and the hallucination rate."""
    lines = [f"{'held-out':<12}{'before':>8}{'after':>8}"]
    for category in [*CATEGORIES, "all"]:
        lines.append(f"{category:<12}{before[category]['exact']:>8.3f}{after[category]['exact']:>8.3f}")
    lines.append(f"{'halluc.':<12}{before['all']['hallucination']:>8.3f}{after['all']['hallucination']:>8.3f}")
    return "\n".join(lines)
