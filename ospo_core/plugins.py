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
from ospo_core.judges.fixed import FixedJudge, janus_answers
from ospo_core.judges.geneval import GenEvalJudge
from ospo_core.judges.vqa import VQAJudge
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
    writes_with_model: bool  # whether the text stages decode with the model (their cost in ospo_core.estimate)

    def prompts(self, cfg) -> pa.Table: ...
    def negatives(self, jobs: list, cfg, round_items: list[dict]) -> pa.Table: ...
    def dense(self, pairs: list[dict], seeds: list[int], cfg) -> pa.Table: ...
    def questions(self, jobs: list[dict], cfg, items: list[dict], round_items: list[dict] | None) -> pa.Table: ...


class Judge(Protocol):
    """Answers yes/no questions about images: `answer(rows, questions)[i]` is the Scores of image row i, or None
    when the image cannot be read at all (a PNG that does not decode).

    A judge whose answers depend on weights besides the stage's model says which in `identity` (cache keys); one
    that scores an image its own way besides the mean of p_yes - p_no (the vqa judge: T2I-CompBench's product, or
    CLIPScore) has `image_scores(rows, answers) -> [float | None]`, which an evaluation reports as the image's score.
    """

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
    writes_with_model = True  # text stages cost decoding time (ospo_core.estimate)
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
        return janus_answers(self.model(), rows, questions, batch_size)


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
JUDGES: dict[str, type] = {"self": SelfJudge, "oracle": shapes.OracleJudge, "fixed": FixedJudge,
                           "geneval": GenEvalJudge, "vqa": VQAJudge}
JUDGES["self_grid"] = shapes.GridSelfJudge  # the testbed model judging its own drawings (testbed/judge.py)
# Judges that may answer with weights other than the stage's model: built with (model loader, judge_model), the fixed
# judge with the round's start model and `same` (whether that is the stage's own model) when judge_model is None;
# self_grid then answers with the stage's model.
JUDGES_WITH_SOURCE = ("fixed", "geneval", "vqa", "self_grid")
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


def make_judge(name: str, load_model: Callable[[], Any], *, judge_model: str | None = None,
               start: tuple | None = None, source: tuple | None = None) -> Judge:
    """Judge `name` from JUDGES. `judge_model` is its weights' folder. Without one, the fixed judge is `start`, the
    (model, adapters, fingerprint) the round started from, and reuses the stage's model (`source`) when that is it
    or when no start is given; self_grid answers with the stage's model."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; choose from {list(JUDGES)}")
    if name not in JUDGES_WITH_SOURCE:
        return JUDGES[name](load_model)
    if name == "fixed" and judge_model is None:
        same = start is None or tuple(start) == tuple(source or ())
        return JUDGES[name](load_model, start or source or ("", (), ""), same=same)
    return JUDGES[name](load_model, judge_model)


def assemble(load_model: Callable[[], Any], *, world: str = "paper", judge: str = "self",
             judge_model: str | None = None, start: tuple | None = None, **fields) -> Tools:
    """The plug-ins of a round by name: `world` from WORLDS, `judge` from JUDGES (`make_judge`: `judge_model` its
    folder, `start` the fixed judge's model, by default the stage's own); unknown names are refused."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose from {list(WORLDS)}")
    made = make_judge(judge, load_model, judge_model=judge_model, start=start, source=fields.get("source"))
    writer, decoder = WORLDS[world]
    return Tools(load_model=load_model, writer=WRITERS[writer](load_model), judge=made,
                 decoder=DECODERS[decoder](load_model), **fields)


def tools_for(bundle, *, world: str = "paper", judge: str = "self", **fields) -> Tools:
    """Tools around a model already in memory (notebooks, tests, the testbed's in-process rounds); the fixed judge
    is this model unless `start` or `judge_model` names another."""
    return assemble(lambda: bundle, world=world, judge=judge, **fields)
