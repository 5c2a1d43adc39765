"""Data-parallel training: `train_ospo` in N processes, one per GPU (or N gloo processes on CPU).

The caller writes a `TrainJob` (what to train on, from which model, with which config) and `train_data_parallel`
starts N copies of this module with `torch.distributed.run`. In each, the HF Trainer underneath OSPOTrainer builds
its accelerate `Accelerator` from the launcher's environment: NCCL on GPUs, gloo on CPU, DDP by default or FSDP2
(`data_parallel="fsdp"`: the frozen base model is sharded over the processes too). Each process loads its own
model, reads its share of every global batch, and the gradients are averaged; the main process writes the adapter
and the metric history. One process (`num_processes=1`) is the same code path without the launcher: `train_ospo` itself.

torchrun rather than `accelerate launch`: the latter starts several CPU processes only through MPI and reads a
user's default accelerate config file, while torchrun is part of torch and starts the same processes everywhere.

The global batch is batch_size x gradient_accumulation_steps x num_processes pairs: 2 processes with 1 accumulation
step train like 1 process with 2 (same pairs per optimizer step, same averaged gradient).

    python -m torch.distributed.run --standalone --nproc_per_node N -m ospo_core.train.launch JOB.json
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict
from transformers import TrainerCallback

from ospo_core import store
from ospo_core.config import TrainConfig
from ospo_core.records import MASKS, PAIRS, TRAIN_HISTORY

PROGRESS = "ospo-train-progress "  # a line the main process prints per optimizer step: "<prefix>{step} {max_steps}"


class TrainJob(BaseModel):
    """Everything a training process needs, written as JSON next to the training output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    adapters: tuple[str, ...] = ()
    fingerprint: str  # of model + adapters: a process that loads other weights refuses to train
    pairs: str  # folder of the PAIRS table
    masks: str | None = None  # folder of the MASKS table (object weighting)
    train: TrainConfig
    output_dir: str
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    run_key: str | None = None  # the stage's cache key: only checkpoints written under it are resumed

    @property
    def history_dir(self) -> Path:
        return Path(self.output_dir) / "history"


def train_data_parallel(job: TrainJob, num_processes: int,
                        progress: Callable[[int, int], None] | None = None) -> pa.Table:
    """Train in `num_processes` processes; returns the metric history (records.TRAIN_HISTORY). Resumes from the
    job's last checkpoint written under the same `run_key`, like `train_ospo`. Raises RuntimeError with the
    processes' last output if they fail."""
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    job_file = output_dir / "job.json"
    store.write_json(job_file, job.model_dump(mode="json"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
               "-m", "ospo_core.train.launch", str(job_file)]
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                if progress:
                    progress(*map(int, line[len(PROGRESS):].split()))
            else:
                tail.append(line)
    if proc.returncode != 0:
        message = (f"data-parallel training ({num_processes} processes) failed with exit code {proc.returncode}; "
                   f"its last output:\n{''.join(tail)}")
        if any("OutOfMemoryError" in line for line in tail):  # so the stage's OOM back-off applies here too
            raise torch.cuda.OutOfMemoryError(message)
        raise RuntimeError(message)
    return store.read_table(job.history_dir, TRAIN_HISTORY, name="train_history")


class _PrintProgress(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"{PROGRESS}{state.global_step} {state.max_steps}", flush=True)


def main(job_file: str) -> None:
    """One training process (started by torchrun: RANK, LOCAL_RANK and WORLD_SIZE are set)."""
    from ospo_core.janus.load import load_janus
    from ospo_core.train.trainer import train_ospo

    job = TrainJob.model_validate_json(Path(job_file).read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    bundle = load_janus(job.model, adapters=job.adapters, device=device)
    if bundle.fingerprint != job.fingerprint:
        raise RuntimeError(f"model {job.model} + {len(job.adapters)} adapters has fingerprint {bundle.fingerprint} "
                           f"here, but the job was made for {job.fingerprint}: every process must load the same "
                           f"weights (same checkpoint folder on every machine)")
    pairs = store.read_table(job.pairs, PAIRS, name="pairs")
    masks = store.read_table(job.masks, MASKS, name="masks") if job.masks else None
    result = train_ospo(pairs, bundle, job.train, job.output_dir, masks=masks, callbacks=[_PrintProgress()],
                        data_parallel=job.data_parallel, run_key=job.run_key)
    if int(os.environ.get("RANK", "0")) == 0:
        store.write_table(result.history, job.history_dir)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
