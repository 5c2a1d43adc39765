"""What a round shows in the Prefect UI: per stage a stats table, a samples table and a picture (thumbnails embedded
in markdown, as the UI cannot reach files on a worker's disk), progress, log lines, and the flow's own summary and
"stage k of N" progress, first on the run's Artifacts tab."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from prefect.artifacts import (
    create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact,
)
from prefect.context import FlowRunContext

from ospo_core import report as views
from ospo_core.config import nearest_preset
from ospo_core.estimate import round_estimate
from ospo_core.records import SCHEMAS
from ospo_core.store import read_table

log = logging.getLogger("ospo.tasks")

SAMPLE_ROWS = 5
# The columns a person reads first, in this order; a table shows those it has.
SAMPLE_COLUMNS = ("item_id", "sub_category", "category", "side", "k", "prompt", "negative_prompt", "dense_prompt",
                  "rejected_prompt", "questions", "question", "p_yes", "p_no", "score", "perturbation", "metric",
                  "step", "value", "source", "ok", "reason", "raw_output")
# OSPO_HOME served over http(s) (a bucket's website, a file server): links and images then point there.
HOME_URL = "OSPO_HOME_URL"


def artifact_key(ctx, name: str) -> str:
    """Prefect artifact keys are lowercase letters, digits and dashes."""
    raw = f"{ctx.round_id}-{name}".lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


def home_url(home: str | Path, path: str | Path | None) -> str | None:
    """The http(s) address of `path` (inside OSPO_HOME) when OSPO_HOME_URL is set, else None."""
    base = os.environ.get(HOME_URL, "")
    if not base.startswith(("http://", "https://")) or path is None:
        return None
    try:
        relative = Path(path).resolve().relative_to(Path(home).resolve())
    except ValueError:
        return None
    return f"{base.rstrip('/')}/{relative.as_posix()}"


def _sample(table: pa.Table) -> pa.Table:
    """The first rows a person should see: accepted rows first, then rejected ones with their reasons."""
    if "ok" not in table.column_names:
        return table.slice(0, SAMPLE_ROWS)
    ok = table.filter(table.column("ok")).slice(0, SAMPLE_ROWS)
    rejected = table.filter(pc.invert(table.column("ok"))).slice(0, SAMPLE_ROWS)
    keep = min(rejected.num_rows, max(SAMPLE_ROWS - ok.num_rows, 2))  # a stage's rejections are shown too
    return pa.concat_tables([ok.slice(0, SAMPLE_ROWS - keep), rejected.slice(0, keep)])


def report(ctx, stage: str, manifest: dict, table: pa.Table, rows_in: int | None, seconds: float,
           inputs: dict[str, pa.Table] | None = None) -> None:
    """Two table artifacts, the stage's stats (rows in and out, ok, rejections by reason, time) and sample rows,
    every row with the same columns (the UI takes its columns from the first row) and empty cells empty; and for a
    stage that makes images or curves, a markdown artifact that shows them (`PICTURES`)."""
    name = ctx.artifact_name(stage)
    tally = views.table_counts(table)
    stats = [{"stage": stage, "rows in": "" if rows_in is None else rows_in, **tally, "seconds": round(seconds, 1)}]
    create_table_artifact(key=artifact_key(ctx, name), table=stats,
                          description=f"{name}: {tally.get('ok', tally['rows'])} of {tally['rows']} rows ok; "
                                      f"table at {manifest['path']}")
    columns = [c for c in SAMPLE_COLUMNS if c in table.column_names]
    samples = [{c: views.cell_text(row[c], 120) for c in columns}
               for row in _sample(table).select(columns).to_pylist()]
    if samples:
        create_table_artifact(key=artifact_key(ctx, f"{name}-samples"), table=samples,
                              description=f"{name}: {len(samples)} sample rows (accepted first, then rejected)")
    picture = PICTURES.get(stage)
    if picture is not None and table.num_rows:
        what, markdown = picture(table, inputs or {})
        if markdown:
            create_markdown_artifact(key=artifact_key(ctx, f"{name}-view"), markdown=markdown,
                                     description=f"{name}: {what}")
    log.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in tally.items()))


def _pairs_picture(table: pa.Table, inputs: dict) -> tuple[str, str | None]:
    sheet = views.pairs_sheet(table)
    return "chosen | rejected images with both prompts", (
        views.embed(sheet, "contact sheet: chosen | rejected", max_px=1024) if sheet is not None else None)


def _curves_picture(table: pa.Table, inputs: dict) -> tuple[str, str | None]:
    curves = views.training_curves(table)
    return "training curves", views.embed(curves, "training curves", max_px=900) if curves is not None else None


def _images_picture(table: pa.Table, inputs: dict) -> tuple[str, str | None]:
    return "sampled images with their prompts", views.images_markdown(table)


def _vqa_picture(table: pa.Table, inputs: dict) -> tuple[str, str | None]:
    return ("an image with its questions, p_yes and p_no",
            views.vqa_markdown(table, inputs["images"]) if "images" in inputs else None)


def _eval_picture(table: pa.Table, inputs: dict) -> tuple[str, str | None]:
    return "mean score per category and sample images", views.eval_markdown(table)


# stage -> (what it shows, markdown) from the stage's table and its input tables
PICTURES = {"images": _images_picture, "vqa": _vqa_picture, "pairs": _pairs_picture,
            "train_history": _curves_picture, "eval": _eval_picture}
PICTURE_INPUTS = {"vqa": ("images",)}  # the input tables a picture needs besides the stage's own


class Progress:
    """A progress artifact for a long stage, updated (and logged) as shards or training steps finish, or as the
    stage's own code logs a record with `extra={"progress": (done, total)}` (text stages, per batch or step)."""

    def __init__(self, ctx, stage: str, what: str):
        name = ctx.artifact_name(stage)
        self.id = create_progress_artifact(0.0, key=artifact_key(ctx, f"{name}-progress"),
                                           description=f"{name}: {what}")
        self.what = f"{name}: {what}"

    def __call__(self, done: int, total: int) -> None:
        self.update(done, total)
        log.info("%s %d/%d", self.what, done, total)

    def update(self, done: int, total: int) -> None:
        update_progress_artifact(self.id, 100.0 * min(done, total) / max(total, 1))

    @contextlib.contextmanager
    def from_logs(self):
        """While the block runs, the project's log records of this thread that carry `progress` update it."""
        handler = _ProgressRecords(self, threading.get_ident())
        project = logging.getLogger("ospo")
        project.addHandler(handler)
        try:
            yield
        finally:
            project.removeHandler(handler)


class _ProgressRecords(logging.Handler):
    def __init__(self, progress: Progress, thread: int):
        super().__init__()
        self.progress, self.thread = progress, thread

    def emit(self, record: logging.LogRecord) -> None:
        done_total = getattr(record, "progress", None)
        if done_total is None or record.thread != self.thread:
            return
        try:
            self.progress.update(*done_total)
        except Exception:  # noqa: BLE001 - a progress bar must never fail the stage
            self.handleError(record)


# ---------------------------------------------------------------- the flow's own artifacts

_ROUNDS: dict[str, "StageCount"] = {}  # flow run id -> its stage count (one flow run per process at a time)


class StageCount:
    """The flow run's "stage k of N" progress artifact and log line, advanced as each planned stage starts."""

    def __init__(self, ctx, stages: list[str]):
        self.stages = stages
        self.id = create_progress_artifact(0.0, key=artifact_key(ctx, "stages"),
                                           description=f"round {ctx.round_id}: stage k of {len(stages)} "
                                                       f"({', '.join(stages)})")

    def started(self, stage: str) -> None:
        if stage in self.stages:
            k = self.stages.index(stage) + 1
            update_progress_artifact(self.id, 100.0 * (k - 1) / len(self.stages))
            log.info("stage %d of %d: %s", k, len(self.stages), stage)

    def replaced(self) -> None:
        """Delete it once the round's summary is there: the UI orders a run's own artifacts by their (random) ids,
        and the summary must come first; a failed round keeps it, showing the stage it stopped at."""
        from prefect import get_client

        with get_client(sync_client=True) as client:
            client.delete_artifact(self.id)


def _flow_run_id() -> str | None:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


def track_stages(ctx, stages: list[str]) -> StageCount:
    """Call from the flow body (the artifact then belongs to the flow run): stage tasks of this flow run advance
    it as they start (`stage_started`); `summarize` replaces it."""
    count = StageCount(ctx, stages)
    _ROUNDS[_flow_run_id() or ""] = count
    return count


def stage_started(stage: str) -> None:
    count = _ROUNDS.get(_flow_run_id() or "")
    if count is not None:
        count.started(stage)


def _table(info: dict, name: str) -> pa.Table:
    return read_table(Path(info["path"]), SCHEMAS[name], name=name)


def summarize(ctx, config, manifest: dict, seconds: float) -> None:
    """The round's summary as the flow run's own markdown artifact: model, preset and scale, lineage, counts,
    training metrics, where the tables are, the contact sheet and the training curves. Call from the flow body."""
    preset, changed = nearest_preset(config)
    if changed:
        preset += f" + {len(changed)} changed field(s): {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}"
    url = partial(home_url, ctx.home)
    pictures = {}
    sheet_path = manifest.get("contact_sheet")
    if sheet_path and url(sheet_path):  # served: the full-size sheet, not a thumbnail
        pictures["Chosen | rejected pairs (the contact sheet)"] = f"![contact sheet]({url(sheet_path)})"
    elif sheet_path and Path(sheet_path).is_file():  # close_round's, embedded downscaled, not drawn again
        with Image.open(sheet_path) as sheet:
            pictures["Chosen | rejected pairs (the contact sheet)"] = views.embed(sheet, "contact sheet", max_px=1024)
    history = manifest.get("tables", {}).get("train_history")
    curves = views.training_curves(_table(history, "train_history")) if history else None
    if curves is not None:
        pictures["Training curves"] = views.embed(curves, "training curves", max_px=900)
    markdown = views.summary_markdown(ctx.round_id, manifest, manifest.get("training", {}), preset=preset,
                                      scale=views.round_scale(config), seconds=seconds, images=pictures,
                                      estimate=round_estimate(config), url=url)
    create_markdown_artifact(key=artifact_key(ctx, "summary"), markdown=markdown,
                             description=f"OSPO round {ctx.round_id}: summary ({config.model}, preset {preset})")
    count = _ROUNDS.pop(_flow_run_id() or "", None)
    if count is not None:
        count.replaced()
