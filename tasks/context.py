"""What the stage tasks of a round share in one process: the round context, the model, the OOM back-off, and the
project logger forwarded to the Prefect run log."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from pydantic import BaseModel

from ospo_core import store
from ospo_core.config import ExecutionConfig
from ospo_core.pipeline import Stage
from ospo_core.plugins import Tools, assemble

log = logging.getLogger("ospo.tasks")


class _RunLog(logging.Handler):
    """Sends the project logger's records ("ospo", "ospo.*") to the log of the Prefect run they happen in, so that
    what a stage says (an OOM back-off, a recomputed shard) is in the UI; outside a run it does nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return
        try:
            get_run_logger().log(record.levelno, "%s", record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never fail the stage
            self.handleError(record)


def forward_project_logs() -> None:
    project = logging.getLogger("ospo")
    if not any(isinstance(h, _RunLog) for h in project.handlers):
        project.addHandler(_RunLog())
    if project.level == logging.NOTSET:
        project.setLevel(logging.INFO)


forward_project_logs()


class StageContext(BaseModel):
    """The round a stage belongs to and the model it runs with (small and serialisable: a task parameter)."""

    round_id: str
    home: str
    model: str
    adapters: tuple[str, ...] = ()
    fingerprint: str
    world: str = "paper"  # plugins.WORLDS: who writes the text and draws the PNGs
    shard_rows: int = 64
    execution: ExecutionConfig = ExecutionConfig()  # how, not what: no table depends on it (see Stage.execution)
    # (model, adapters, fingerprint) the round started from: the fixed judge's model (None = this model itself)
    start: tuple[str, tuple[str, ...], str] | None = None

    @property
    def round_path(self) -> Path:
        return store.round_dir(Path(self.home), self.round_id)

    def artifact_name(self, stage: str) -> str:
        """How a stage's artifacts are named in this context (an evaluation names its set and model)."""
        return stage


# ---------------------------------------------------------------- models (one per process, loaded on first use)

_BUNDLES: dict[tuple, Any] = {}


def bundle_for(ctx: StageContext):
    """The model of this round, loaded once per process (stages share it; training loads its own copy)."""
    from ospo_core.janus.load import load_janus

    key = (ctx.model, ctx.adapters)
    if key not in _BUNDLES:
        _BUNDLES.clear()  # one model in memory at a time
        _BUNDLES[key] = load_janus(ctx.model, adapters=ctx.adapters)
    bundle = _BUNDLES[key]
    if bundle.fingerprint != ctx.fingerprint:
        raise RuntimeError(
            f"model {ctx.model} + {len(ctx.adapters)} adapters now has fingerprint {bundle.fingerprint}, but the round "
            f"started with {ctx.fingerprint}: the weights changed under a running round; start a new round"
        )
    return bundle


def keep_model(ctx: StageContext, bundle) -> None:
    """Make `bundle` (already loaded, e.g. to fingerprint it) the model `bundle_for(ctx)` returns in this process."""
    _BUNDLES.clear()
    _BUNDLES[(ctx.model, ctx.adapters)] = bundle


def round_tools(ctx: StageContext, cfg, **fields) -> Tools:
    """The round's plug-ins for one stage. The judge is a setting of the stage that judges (`VQAConfig.judge`)."""
    return assemble(partial(bundle_for, ctx), world=ctx.world, judge=getattr(cfg, "judge", "self"),
                    judge_model=getattr(cfg, "judge_model", None), start=ctx.start,
                    source=(ctx.model, ctx.adapters, ctx.fingerprint), execution=ctx.execution, **fields)


@dataclass
class StageCall:
    """A stage's computation on some rows, picklable so that a Ray model replica can run it: `call(cfg, tables)`
    with the rows to process by input name (a shard, or a piece, or everything)."""

    stage: Stage
    ctx: StageContext
    whole: dict[str, pa.Table] | None = None  # the whole inputs, for a stage that reads the round's words
    tool_fields: dict = field(default_factory=dict)  # training: its folder, key, progress (never sent to Ray)

    def __call__(self, cfg, tables: dict[str, Any]) -> pa.Table:
        extra = {"whole": self.whole} if self.stage.whole else {}
        return self.stage.function(**tables, tools=round_tools(self.ctx, cfg, **self.tool_fields), cfg=cfg, **extra)


def with_oom_backoff(run: Callable[..., pa.Table], cfg, *args) -> pa.Table:
    """Run; on a CUDA out-of-memory error halve cfg.batch_size and go on (down to 1), instead of failing the round.
    An "auto" batch size becomes half of what the free-memory rule last chose.

    A training config keeps its pairs per optimizer step: the micro-batch drops to the largest divisor of it that
    is at most half, and gradient accumulation grows by the same factor (8 x 4 -> 4 x 8; 6 x 4 -> 3 x 8).
    """
    import torch

    while True:
        try:
            return run(cfg, *args)
        except torch.cuda.OutOfMemoryError:
            size = getattr(cfg, "batch_size", 1)
            if size == "auto":  # halve what the free-memory rule chose
                from ospo_core.janus.memory import last_auto_batch

                size = last_auto_batch()
            if size <= 1:
                raise
            torch.cuda.empty_cache()
            if hasattr(cfg, "gradient_accumulation_steps"):
                smaller = next(d for d in range(size // 2, 0, -1) if size % d == 0)
                update = {"batch_size": smaller}
                if cfg.gradient_accumulation_steps is not None:  # else derived from pairs_per_step: grows by itself
                    update["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps * (size // smaller)
            else:
                update = {"batch_size": size // 2}
            cfg = cfg.model_copy(update=update)
            log.warning("CUDA out of memory: retrying with %s", ", ".join(f"{k}={v}" for k, v in update.items()))
