"""One OSPO self-improvement round as a Prefect flow (arXiv 2506.02015 v2).

The model writes its own compositional prompts, turns each into object-level hard negatives and dense rewrites,
draws images for both sides, asks itself decompositional questions about every image, selects chosen/rejected
pairs and the rejected prompt, and trains a LoRA adapter with SimPO + conditional preference + SFT.

Supports: the built-in tiny model (demo, tests) or a local transformers-format Janus-Pro checkpoint, plus the
adapters of earlier rounds. Every stage writes a Parquet table under `OSPO_HOME/runs/<round_id>/` and is cached by
(config, input hashes, model fingerprint, code): re-running a round id resumes it. `config.execution` spreads the
model stages over a Ray cluster and training over several processes, with the same tables (deployments/ray.md).

In the Prefect UI the run form starts from the demo preset (the tiny model, a few minutes on a CPU); `preset` picks
the settings of the fields left as they are, the run is named after its round id, and the run's Artifacts tab opens
on the round's summary and its "stage k of N" progress, then each stage's tables and pictures.

Run it:
    ospo run --model tiny                          # in-process, prints a summary
    prefect deployment run 'ospo-round/ospo-round' # from the UI or CLI once `ospo serve` is up
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from ospo_core.config import PRESETS, RoundConfig, apply_preset, preset_config
from ospo_core.pipeline import MASKS, ROUND
from tasks import stages
from tasks.report import summarize, track_stages
from tasks.round import check_pairs, close_round, open_round, record_attempt_end
from tasks.runner import now_id


Preset = Literal[tuple(PRESETS)]  # the run form's choice: demo, paper, testbed, ...


def round_run_name() -> str:
    """The flow run is named after its round: the given round id, or a new one from the date and time."""
    config = flow_run.parameters.get("config")
    round_id = config.get("round_id") if isinstance(config, dict) else getattr(config, "round_id", None)
    return round_id or now_id()


@flow(name="ospo-round", flow_run_name=round_run_name, validate_parameters=True, on_failure=[record_attempt_end],
      on_crashed=[record_attempt_end], on_cancellation=[record_attempt_end])
def ospo_round(config: RoundConfig = preset_config("demo"), preset: Preset = "demo",
               home: str | None = None, promote: bool = True) -> dict:
    """One OSPO round: prompts, hard negatives, images, self-VQA, preference pairs, LoRA training.

    Args:
        config: The round's settings. The form starts from the demo preset: the built-in tiny model, a few prompts
            per sub-category, short text budgets and 8 training steps (a few minutes on a CPU). Set `model` to a
            checkpoint folder on the worker's machine to train a real Janus-Pro.
        preset: Where the fields you leave as they are take their values from: demo (the form as shown), paper (the
            paper's settings: 16,002 prompts, 512-token budgets, 500 training steps; hours on a GPU), testbed (the
            shapes world, for a checkpoint made by `ospo testbed`) or another preset of ospo_core/config.py. A field
            you changed keeps your value.
        home: Artifact root on the worker's machine (default: the worker's OSPO_HOME, else ./.ospo in its checkout).
        promote: Register the trained adapter as promoted, so the next round starts from it (the nightly flow
            decides this with its evaluation gate instead).
    """
    started = time.monotonic()
    config = apply_preset(config, preset)
    if config.round_id is None:  # the run's name (round_run_name) is the new round's id
        config = config.model_copy(update={"round_id": flow_run.get_name()})
    ctx = open_round(config, home)
    track_stages(ctx, [s.name for s in ROUND if s is not MASKS or config.train.object_weighting])

    # 1. Initial prompt generation: compositional prompts in 12 sub-categories, with their relation tuples.
    prompts = stages.generate_prompts(ctx, config.prompts)

    # 2. Hard preference pair generation: object-level negatives, dense rewrites of both, images of both sides.
    negatives = stages.perturb(ctx, config.perturb, prompts=prompts)
    dense = stages.densify(ctx, config.densify, negatives=negatives)
    images = stages.render(ctx, config.render, dense=dense)

    # 3. Filtering and selection: self-asked questions, self-VQA answers, chosen/rejected images + rejected prompt.
    questions = stages.questions(ctx, config.questions, prompts=prompts, negatives=negatives)
    vqa = stages.self_vqa(ctx, config.vqa, images=images, questions=questions)
    pairs = stages.select_pairs(ctx, config.select, images=images, vqa=vqa, questions=questions, negatives=negatives)
    masks = (stages.object_masks(ctx, config.masks, pairs=pairs, prompts=prompts)
             if config.train.object_weighting else None)

    # 4. Object-centric preference optimization: LoRA with SimPO + conditional preference + SFT.
    check_pairs(ctx, pairs)
    trained = stages.train(ctx, config.train, pairs=pairs, masks=masks)

    refs = {"prompts": prompts, "negatives": negatives, "dense": dense, "images": images, "questions": questions,
            "vqa": vqa, "pairs": pairs, "masks": masks, "train_history": trained}
    manifest = close_round(ctx, config, refs, promote)
    summarize(ctx, config, manifest, time.monotonic() - started)
    return manifest
