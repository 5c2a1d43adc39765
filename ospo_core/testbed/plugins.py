"""The shapes world as plug-ins of a round (`RoundConfig.world = "shapes"`, `VQAConfig.judge = "oracle"`).

The world writes the text stages exactly from each caption's structure (`text.py`), the oracle reads the drawn token
grid and answers exactly (`oracle.py`), and the grid painter draws the tokens (`render.py`): with the oracle the
model only draws and trains, so a round measures what preference optimisation does to its drawing. These take the
model loader the round hands every plug-in and never call it. `GridSelfJudge` (`VQAConfig.judge = "self_grid"`) is
the model judging its own PNGs instead (`judge.py`), as OSPO's self-VQA does.
"""

from __future__ import annotations

import functools

import pyarrow as pa

from ospo_core.janus.memory import CPU_BATCH
from ospo_core.judges.fixed import frozen_model
from ospo_core.judges.folders import folder_identity
from ospo_core.testbed import judge, oracle, render, text, world
from ospo_core.testbed.model import check_testbed_model


class WorldWriter:
    name = "shapes"
    code = (text, world)
    writes_with_model = False  # the world writes from each caption's structure: no decoding

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


class GridSelfJudge:
    """The testbed model answers from the decoded PNG: each cell re-encoded to its code, read by the model's own
    language model (`judge.py`). A PNG that does not decode, or is not a grid drawing, gets None.

    `judge_model`, a testbed checkpoint folder, answers instead of the stage's model: the model as it was before
    self-improvement (`TestbedConfig.self_judge = "start"`), whose understanding the rounds' drawing updates cannot
    erode (TESTBED.md measures that they do)."""

    name = "self_grid"
    code = (judge, render, world)
    columns = ()
    unknown_reason = "unreadable_question"  # never used: the model answers any question

    def __init__(self, model, judge_model: str | None = None):
        self.folder = judge_model
        self.model = model if judge_model is None else functools.partial(_judge_checkpoint, judge_model)

    @property
    def identity(self) -> str:
        """What the answers depend on besides the stage's model (cache keys): the judge folder's weights."""
        return "" if self.folder is None else f"{self.folder}:{folder_identity(self.folder)}"

    def answer(self, rows, questions, batch_size):
        from ospo_core.records import decode_image

        seen = {}  # an image asked several question sets is read once

        def read(row):
            image = decode_image(row["image"])
            return None if image is None else judge.encode_png(image)

        grids = [seen[id(row)] if id(row) in seen else seen.setdefault(id(row), read(row)) for row in rows]
        readable = [i for i, grid in enumerate(grids) if grid is not None]
        # batch_size counts images (VQAConfig); a batch of the model holds their questions.
        images = CPU_BATCH if batch_size == "auto" else batch_size  # the grid judge is small: no memory rule
        per_batch = images * max(1, max((len(qs) for qs in questions), default=1))
        scores = judge.grid_yes_no(self.model(), [grids[i] for i in readable], [questions[i] for i in readable],
                                   batch_size=per_batch)
        out = [None] * len(rows)
        for i, s in zip(readable, scores):
            out[i] = s
        return out


def _judge_checkpoint(folder: str):
    bundle = frozen_model(folder)
    check_testbed_model(bundle)
    return bundle


class GridDecoder:
    """The tokens are scene cells: draw them (a testbed checkpoint's VQ decoder is untrained)."""

    name = "grid"
    code = (render, world)

    def __init__(self, model=None):
        del model

    def decode(self, tokens) -> list:
        return [render.draw_scene(t) for t in tokens.tolist()]
