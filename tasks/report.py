"""What a stage shows in the Prefect UI: a stats table, a samples table, progress, and log lines."""

from __future__ import annotations

import logging

import pyarrow as pa
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from ospo_core.report import table_counts

log = logging.getLogger("ospo.tasks")

SAMPLE_ROWS = 5
# The columns a person reads first, in this order; a table shows those it has.
SAMPLE_COLUMNS = ("item_id", "sub_category", "side", "k", "prompt", "negative_prompt", "dense_prompt",
                  "rejected_prompt", "questions", "question", "p_yes", "p_no", "perturbation", "metric", "step",
                  "value", "source", "ok", "reason")


def artifact_key(ctx, name: str) -> str:
    """Prefect artifact keys are lowercase letters, digits and dashes."""
    raw = f"{ctx.round_id}-{name}".lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def report(ctx, stage: str, manifest: dict, table: pa.Table, rows_in: int | None, seconds: float) -> None:
    """Two table artifacts: the stage's stats (rows in and out, ok, rejections by reason, time) and sample rows,
    every row with the same columns (the UI takes its columns from the first row) and empty cells empty."""
    name = ctx.artifact_name(stage)
    tally = table_counts(table)
    stats = [{"stage": stage, "rows in": "" if rows_in is None else rows_in, **tally, "seconds": round(seconds, 1)}]
    create_table_artifact(key=artifact_key(ctx, name), table=stats,
                          description=f"{name}: {tally.get('ok', tally['rows'])} of {tally['rows']} rows ok; "
                                      f"table at {manifest['path']}")
    columns = [c for c in SAMPLE_COLUMNS if c in table.column_names]
    samples = [{c: _cell(row[c]) for c in columns} for row in table.slice(0, SAMPLE_ROWS).select(columns).to_pylist()]
    if samples:
        create_table_artifact(key=artifact_key(ctx, f"{name}-samples"), table=samples,
                              description=f"{name}: the first {len(samples)} rows")
    log.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in tally.items()))


class Progress:
    """A progress artifact for a long stage, updated (and logged) as shards or training steps finish."""

    def __init__(self, ctx, stage: str, what: str):
        name = ctx.artifact_name(stage)
        self.id = create_progress_artifact(0.0, key=artifact_key(ctx, f"{name}-progress"),
                                           description=f"{name}: {what}")
        self.what = f"{name}: {what}"

    def __call__(self, done: int, total: int) -> None:
        update_progress_artifact(self.id, 100.0 * done / max(total, 1))
        log.info("%s %d/%d", self.what, done, total)
