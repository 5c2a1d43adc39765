"""What a round is assembled from besides its stages: who writes the text, who judges the images, what draws them.

The paper has one of each: the model writes prompts, negatives, dense rewrites and questions (`ModelWriter`), the
model answers its own questions (`SelfJudge`) and its VQ decoder turns image tokens into PNGs (`VQDecoder`). The
shapes-world testbed plugs in its grammar, its oracle and its grid painter (`ospo_core.testbed.plugins`). A stage
never asks which one it has: it builds its jobs and hands them to `tools.writer`, `tools.judge` or `tools.decoder`.

Plug-ins are chosen by name where a round is assembled (`assemble`), from the registries below:
`RoundConfig.world` picks a writer and a decoder (`WORLDS`), `VQAConfig.judge` a judge. A plug-in class lists the
modules its output depends on in `code`, so that a stage's cache key changes when the plug-in's code does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from ospo_core.config import ExecutionConfig
from ospo_core.janus import image as janus_image
from ospo_core.janus import score as janus_score
from ospo_core.janus import text as janus_text
from ospo_core.stages import densify as densify_stage
from ospo_core.stages import perturb as perturb_stage
from ospo_core.stages import prompts as prompts_stage
from ospo_core.stages import questions as questions_stage
from ospo_core.testbed import plugins as shapes

Scores = list[tuple[float, float] | None]  # (p_yes, p_no) per question; None where the judge cannot read it


class TextWriter(Protocol):
    """Writes what the paper's model writes, one method per text stage, from the jobs the stage built and checked."""

    name: str
    code: tuple

    def prompts(self, cfg) -> pa.Table: ...
    def negatives(self, jobs: list, cfg, round_items: list[dict]) -> pa.Table: ...
    def dense(self, pairs: list[dict], seeds: list[int], cfg) -> pa.Table: ...
    def questions(self, jobs: list[dict], cfg, items: list[dict], round_items: list[dict] | None) -> pa.Table: ...


class Judge(Protocol):
    """Answers yes/no questions about images: `answer(rows, questions)[i]` is the Scores of image row i, or None
    when the image cannot be read at all (a PNG that does not decode)."""

    name: str
    code: tuple
    columns: tuple[str, ...]  # the IMAGES columns it reads besides the image
    unknown_reason: str  # reason code of a question it cannot read

    def answer(self, rows: list[dict], questions: list[list[str]], batch_size: int) -> list[Scores | None]: ...


class Decoder(Protocol):
    """Turns sampled image tokens, (B, N), into the PNGs stored beside them."""

    name: str
    code: tuple

    def decode(self, tokens) -> list: ...


# ---------------------------------------------------------------- the paper's plug-ins: the model itself


class ModelWriter:
    """The paper: the model writes every text stage's output through its few-shot chats."""

    name = "model"
    code = (janus_text,)

    def __init__(self, model: Callable[[], Any]):
        self.model = model

    def prompts(self, cfg) -> pa.Table:
        return prompts_stage.write_prompts(self.model(), cfg)

    def negatives(self, jobs, cfg, round_items) -> pa.Table:
        return perturb_stage.write_negatives(self.model(), jobs, cfg, round_items)

    def dense(self, pairs, seeds, cfg) -> pa.Table:
        return densify_stage.write_dense(self.model(), pairs, seeds, cfg)

    def questions(self, jobs, cfg, items, round_items) -> pa.Table:
        return questions_stage.write_questions(self.model(), jobs, cfg, items, round_items)


class SelfJudge:
    """The paper: the model answers from the decoded PNG (yes/no probabilities, the image prefix shared)."""

    name = "self"
    code = (janus_score,)
    columns = ()
    unknown_reason = "unreadable_question"  # never used: the model answers any question

    def __init__(self, model: Callable[[], Any]):
        self.model = model

    def answer(self, rows, questions, batch_size) -> list[Scores | None]:
        from ospo_core.records import decode_image

        decoded = {}  # an image asked several question sets is decoded once
        images = [decoded[id(row)] if id(row) in decoded else decoded.setdefault(id(row), decode_image(row["image"]))
                  for row in rows]
        readable = [i for i, image in enumerate(images) if image is not None]
        scores = janus_score.score_yes_no(self.model(), [images[i] for i in readable],
                                          [questions[i] for i in readable], batch_size=batch_size)
        out: list[Scores | None] = [None] * len(rows)
        for i, s in zip(readable, scores):
            out[i] = s
        return out


class VQDecoder:
    """The paper: the model's VQ decoder."""

    name = "vq"
    code = (janus_image,)

    def __init__(self, model: Callable[[], Any]):
        self.model = model

    def decode(self, tokens) -> list:
        return janus_image.decode_images(self.model(), tokens)


# ---------------------------------------------------------------- registries

WRITERS: dict[str, type] = {"model": ModelWriter, "shapes": shapes.WorldWriter}
JUDGES: dict[str, type] = {"self": SelfJudge, "oracle": shapes.OracleJudge}
DECODERS: dict[str, type] = {"vq": VQDecoder, "grid": shapes.GridDecoder}
# RoundConfig.world -> (writer, decoder): one switch selects the testbed world.
WORLDS: dict[str, tuple[str, str]] = {"paper": ("model", "vq"), "shapes": ("shapes", "grid")}


@dataclass
class Tools:
    """What a stage function is handed besides its tables and config: the model (loaded on first use), the
    plug-ins, and what the training stage needs to write its adapter (its folder, its key, progress)."""

    load_model: Callable[[], Any]
    writer: TextWriter
    judge: Judge
    decoder: Decoder
    workdir: Path | None = None  # a folder for files besides the table (training writes train/ here)
    key: str = ""  # the stage's cache key: training resumes only checkpoints written under it
    progress: Callable[[int, int], None] | None = None
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    source: tuple[str, tuple[str, ...], str] = ("tiny", (), "")  # (model, adapters, fingerprint) for a new copy
    table_paths: dict[str, Path] = field(default_factory=dict)  # input folders, for processes that read them

    @cached_property
    def model(self):
        return self.load_model()


def assemble(load_model: Callable[[], Any], *, world: str = "paper", judge: str = "self", **fields) -> Tools:
    """The plug-ins of a round by name: `world` from WORLDS, `judge` from JUDGES; unknown names are refused."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose from {list(WORLDS)}")
    if judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; choose from {list(JUDGES)}")
    writer, decoder = WORLDS[world]
    return Tools(load_model=load_model, writer=WRITERS[writer](load_model), judge=JUDGES[judge](load_model),
                 decoder=DECODERS[decoder](load_model), **fields)


def tools_for(bundle, *, world: str = "paper", judge: str = "self", **fields) -> Tools:
    """Tools around a model already in memory (notebooks, tests, the testbed's in-process rounds)."""
    return assemble(lambda: bundle, world=world, judge=judge, **fields)
