"""The round as a list of stage declarations: each names its function, the tables it reads and writes, how it
shards and resumes, and which plug-ins it uses. `tasks/` turns each declaration into one Prefect task; `flows/round.py`
calls them in the paper's order. Adding a stage is one function in `ospo_core/stages/` and one declaration here.

A stage function is called as `function(**inputs, tools=tools, cfg=cfg)` with its input tables by name (`reads`),
the round's `plugins.Tools` and its config, and returns its table (`records.SCHEMAS[name]`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pyarrow as pa

from ospo_core import evaluate, records, templates
from ospo_core.stages import densify, masks, perturb, prompts, questions, render, select, vqa
from ospo_core.stages import eval as eval_stage
from ospo_core.stages import train as train_stage
from ospo_core.train import data as train_data
from ospo_core.train import launch as train_launch
from ospo_core.train import loss as train_loss
from ospo_core.train import trainer as train_trainer

PLUGINS = ("writer", "judge", "decoder")


@dataclass(frozen=True)
class Stage:
    """One method step as the task runner sees it."""

    name: str  # the table it writes (records.SCHEMAS) and its folder in the round
    task: str  # the Prefect task name (the UI shows it)
    function: Callable
    reads: tuple[str, ...] = ()  # input tables, passed by name; an input may be None where the round has none
    config: str = ""  # the RoundConfig field of its settings (a test's toy stage may have none)
    code: tuple[ModuleType, ...] = ()  # modules besides the function's own whose change recomputes it
    uses: tuple[str, ...] = ()  # plug-ins (PLUGINS) whose choice and code its table depends on
    shard: str | None = None  # resumable shards: one file per `shard_rows` rows of this input
    split: bool = False  # its input rows may be cut into pieces spread over workers (Ray); one file either way
    whole: bool = False  # a split stage that also needs the whole inputs (`whole=`), e.g. the round's words
    execution: tuple[str, ...] = ()  # ExecutionConfig fields its result depends on (training: the global batch)
    progress: str | None = None  # what a progress step counts, for stages long enough to report progress
    outputs: tuple[str, ...] = ()  # files besides the table (relative to the round folder) the cache must find
    schema: pa.Schema | None = None  # of the table it writes; None = records.SCHEMAS[name]

    def __post_init__(self):
        unknown = [u for u in self.uses if u not in PLUGINS]
        if unknown:
            raise ValueError(f"stage {self.name}: unknown plug-in(s) {unknown}; expected some of {PLUGINS}")
        if self.shard is not None and self.shard not in self.reads:
            raise ValueError(f"stage {self.name}: shards over {self.shard!r}, which it does not read {self.reads}")


# 1. Initial prompt generation
PROMPTS = Stage("prompts", "generate-prompts", prompts.generate_prompts, config="prompts", code=(templates,),
                uses=("writer",), progress="prompts accepted of those wanted")

# 2. Hard preference pair generation
NEGATIVES = Stage("negatives", "perturb", perturb.perturb, reads=("prompts",), config="perturb", code=(templates,),
                  uses=("writer",), split=True, whole=True, progress="negatives written")
DENSE = Stage("dense", "densify", densify.densify, reads=("negatives",), config="densify", code=(templates,),
              uses=("writer",), split=True, progress="dense rewrites written")
IMAGES = Stage("images", "render", render.render, reads=("dense",), config="render", uses=("decoder",),
               shard="dense", progress="dense shards rendered")

# 3. Filtering and selection
QUESTIONS = Stage("questions", "questions", questions.generate_questions, reads=("prompts", "negatives"),
                  config="questions", code=(templates,), uses=("writer",), split=True, whole=True,
                  progress="question lists written")
VQA = Stage("vqa", "self-vqa", vqa.self_vqa, reads=("images", "questions"), config="vqa", uses=("judge",),
            shard="images", progress="image shards scored")
PAIRS = Stage("pairs", "select-pairs", select.select, reads=("images", "vqa", "questions", "negatives"),
              config="select")
MASKS = Stage("masks", "object-masks", masks.object_masks, reads=("pairs", "prompts"), config="masks")

# 4. Object-centric preference optimization
TRAIN = Stage("train_history", "train", train_stage.train, reads=("pairs", "masks"), config="train",
              code=(train_trainer, train_loss, train_data, train_launch), execution=("num_processes", "data_parallel"),
              progress="training steps",
              outputs=("train/adapter/adapter_model.safetensors", "train/adapter/adapter_config.json"))

ROUND: tuple[Stage, ...] = (PROMPTS, NEGATIVES, DENSE, IMAGES, QUESTIONS, VQA, PAIRS, MASKS, TRAIN)

# Held-out evaluation (flows/evaluate.py): one question sheet per prompt set, then images judged shard by shard.
EVAL_QUESTIONS = Stage("eval_questions", "eval-questions", eval_stage.eval_questions, reads=("prompts",),
                       code=(evaluate, questions, templates))
EVAL = Stage("eval", "judge-eval", eval_stage.judge_images, reads=("questions",), code=(evaluate,), uses=("judge",),
             shard="questions", progress="prompt shards drawn and judged")
# The same images judged again by another judge (the trained model itself, beside the fixed judge: judge drift).
REJUDGE = Stage("eval_rejudged", "rejudge-eval", eval_stage.rejudge_images, reads=("eval",), code=(evaluate,),
                uses=("judge",), shard="eval", progress="eval shards judged again", schema=records.EVAL)
