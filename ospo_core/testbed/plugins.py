"""The shapes world as plug-ins of a round (`RoundConfig.world = "shapes"`, `VQAConfig.judge = "oracle"`).

The world writes the text stages exactly from each caption's structure (`text.py`), the oracle reads the drawn token
grid and answers exactly (`oracle.py`), and the grid painter draws the tokens (`render.py`): the model only draws
and trains, so a round measures what preference optimisation does to its drawing. They take the model loader the
round hands every plug-in and never call it.
"""

from __future__ import annotations

import pyarrow as pa

from ospo_core.testbed import oracle, render, text, world


class WorldWriter:
    name = "shapes"
    code = (text, world)

    def __init__(self, model=None):
        del model  # the world writes without the model

    def prompts(self, cfg) -> pa.Table:
        return text.testbed_prompts(cfg)

    def negatives(self, jobs, cfg, round_items) -> pa.Table:
        return text.testbed_negatives(jobs)

    def dense(self, pairs, seeds, cfg) -> pa.Table:
        return text.testbed_dense(pairs, seeds)

    def questions(self, jobs, cfg, items, round_items) -> pa.Table:
        return text.testbed_questions(jobs)


class OracleJudge:
    """Reads the image tokens, never the PNG, so what it judges is exactly what the model drew."""

    name = "oracle"
    code = (oracle, world)
    columns = ("image_tokens",)
    unknown_reason = "oracle_unknown_question"

    def __init__(self, model=None):
        del model

    def answer(self, rows, questions, batch_size):
        return [oracle.oracle_scores(row["image_tokens"], qs) for row, qs in zip(rows, questions)]


class GridDecoder:
    """The tokens are scene cells: draw them (a testbed checkpoint's VQ decoder is untrained)."""

    name = "grid"
    code = (render, world)

    def __init__(self, model=None):
        del model

    def decode(self, tokens) -> list:
        return [render.draw_scene(t) for t in tokens.tolist()]
