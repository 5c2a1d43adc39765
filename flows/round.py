"""One OSPO self-improvement round as a Prefect flow (arXiv 2506.02015 v2).

The model writes its own compositional prompts, turns each into object-level hard negatives and dense rewrites,
draws images for both sides, asks itself decompositional questions about every image, selects chosen/rejected
pairs and the rejected prompt, and trains a LoRA adapter with SimPO + conditional preference + SFT.

Supports: the built-in tiny model (demo, tests) or a local transformers-format Janus-Pro checkpoint, plus the
adapters of earlier rounds. Every stage writes a Parquet table under `OSPO_HOME/runs/<round_id>/` and is cached by
(config, input hashes, model fingerprint, code): re-running a round id resumes it. `config.execution` spreads the
model stages over a Ray cluster and training over several processes, with the same tables (deployments/ray.md).

Run it:
    ospo run --model tiny                          # in-process, prints a summary
    prefect deployment run 'ospo-round/ospo-round' # from the UI or CLI once `ospo serve` is up
"""

from __future__ import annotations

from prefect import flow

from ospo_core.config import RoundConfig
from tasks import stages
from tasks.round import check_pairs, close_round, open_round, record_attempt_end


@flow(name="ospo-round", validate_parameters=True, on_failure=[record_attempt_end], on_crashed=[record_attempt_end],
      on_cancellation=[record_attempt_end])
def ospo_round(config: RoundConfig = RoundConfig(), home: str | None = None, promote: bool = True) -> dict:
    ctx = open_round(config, home)

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
    return close_round(ctx, config, refs, promote)
