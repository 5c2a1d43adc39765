"""Stage 4: object-centric preference optimization, as a round runs it.

Trains a LoRA adapter on the round's pairs (and object masks) into `<round>/train/adapter`, in this process on its
own copy of the model (LoRA layers go into it), or data-parallel in `execution.num_processes` processes, which load
their own. Checkpoints are marked with the stage key (`tools.key`): a rerun with other settings or other pairs starts
fresh instead of resuming a stranger's checkpoint. Returns the metric history (records.TRAIN_HISTORY).
"""

from __future__ import annotations

import pyarrow as pa
from transformers import TrainerCallback

from ospo_core.config import TrainConfig
from ospo_core.records import TRAIN_HISTORY, to_table
from ospo_core.train import launch, trainer


class _ReportSteps(TrainerCallback):
    def __init__(self, progress):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress(state.global_step, state.max_steps)


def train(pairs: pa.Table, masks: pa.Table | None, tools, cfg: TrainConfig) -> pa.Table:
    out = tools.workdir / "train"
    cfg.accumulation(tools.execution.num_processes)  # a step that does not divide is refused before any process starts
    model, adapters, fingerprint = tools.source
    if tools.execution.num_processes > 1:
        job = launch.TrainJob(model=model, adapters=adapters, fingerprint=fingerprint,
                              pairs=str(tools.table_paths["pairs"]),
                              masks=str(tools.table_paths["masks"]) if masks is not None else None,
                              train=cfg, output_dir=str(out), data_parallel=tools.execution.data_parallel,
                              run_key=tools.key)
        return launch.train_data_parallel(job, tools.execution.num_processes, tools.progress)
    from ospo_core.janus.load import load_janus

    bundle = load_janus(model, adapters=adapters)  # its own copy: LoRA layers go into it
    callbacks = [_ReportSteps(tools.progress)] if tools.progress else []
    result = trainer.train_ospo(pairs, bundle, cfg, out, masks=masks, callbacks=callbacks, run_key=tools.key)
    return to_table(result.history.to_pylist(), TRAIN_HISTORY)
