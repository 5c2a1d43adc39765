"""The two bookends of a round: open it (folder, model, lineage, the attempt) and close it (manifest, registry,
contact sheet); the flow itself writes the summary artifact (tasks/report.py).

A round's `manifest.json` is its last good state: what `ospo eval`, `ospo rounds` and the registry read. Each run of
the round is an *attempt*, recorded in `attempts/<started>.json` (config, Prefect run id, status, error); a rerun of a
finished round never touches its manifest until it finishes too, so a failed rerun leaves the round as it was.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from prefect import task
from prefect.runtime import flow_run

from ospo_core import store
from ospo_core.config import RoundConfig
from ospo_core.janus.load import load_janus, merged_fingerprint
from ospo_core.stages.prompts import prompt_shortfall
from ospo_core.report import contact_sheet, table_counts
from tasks.context import StageContext, keep_model
from tasks.runner import now_id, read_ref

log = logging.getLogger("ospo.tasks")


class NoPairsError(RuntimeError):
    """The round selected no preference pairs, so there is nothing to train on."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _attempt_path(round_path: Path, run_id: str) -> Path:
    return round_path / "attempts" / f"{time.strftime('%Y%m%dT%H%M%S')}-{run_id[:8] or os.getpid()}.json"


@task(name="open-round")
def open_round(config: RoundConfig, home: str | None = None) -> StageContext:
    """Create the round folder, load the start model (base + earlier adapters) and record the attempt."""
    home_path = Path(home) if home else store.ospo_home()
    round_id = store.check_round_id(config.round_id or now_id())
    round_path = store.round_dir(home_path, round_id)
    store.lock_round(round_path)  # held until close_round (or this process ends); refused at once if busy
    bundle = load_janus(config.model, adapters=tuple(config.adapters))
    ctx = StageContext(round_id=round_id, home=str(home_path), model=config.model, adapters=tuple(config.adapters),
                       fingerprint=bundle.fingerprint, world=config.world, shard_rows=config.shard_rows,
                       execution=config.execution)
    keep_model(ctx, bundle)
    started, run_id = _now(), str(flow_run.get_id() or "")
    attempt = {"round_id": round_id, "started": started, "flow_run_id": run_id,
               "config": config.model_dump(mode="json"), "status": "running"}
    store.write_json(_attempt_path(round_path, run_id), attempt)
    previous = store.read_manifest(round_path) if (round_path / "manifest.json").is_file() else {}
    if previous.get("status") != "finished":  # a finished round keeps its manifest until this attempt finishes
        store.write_manifest(round_path, {
            **previous,
            "round_id": round_id,
            "path": str(round_path),
            "config": config.model_dump(mode="json"),
            "model": {"source": config.model, "adapters": list(config.adapters), "fingerprint": bundle.fingerprint},
            "code_version": _code_version(),
            "started": previous.get("started", started),
            "status": "running",
        })
    log.info("round %s in %s, model %s (fingerprint %s)", round_id, round_path, config.model, bundle.fingerprint)
    return ctx


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ospo")
    except PackageNotFoundError:
        return "unknown"


def _end_attempts(paths, flow_run_id: str, status: str, error: str | None = None) -> list[Path]:
    """Mark the running attempts of Prefect run `flow_run_id`; returns their round folders."""
    ended = []
    for path in paths:
        try:
            attempt = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if attempt.get("flow_run_id") == flow_run_id and attempt.get("status") == "running":
            store.write_json(path, {**attempt, "status": status, "ended": _now(), "error": error})
            ended.append(path.parent.parent)
    return ended


def record_attempt_end(flow, run, state) -> None:
    """Flow hook (failure, crash, cancellation): mark the round's running attempt with how it ended and release the
    round's lock (a long-lived worker process must not keep a failed round locked)."""
    home = Path(run.parameters.get("home") or store.ospo_home())
    for round_path in _end_attempts(home.glob("runs/*/attempts/*.json"), str(run.id), state.name.lower(),
                                    state.message):
        store.unlock_round(round_path)


@task(name="check-pairs")
def check_pairs(ctx: StageContext, pairs: dict) -> None:
    """Stop the round with its selection's rejection counts when it selected no pair (nothing to train on)."""
    counts = table_counts(read_ref(pairs))
    if counts.get("ok", 0) == 0:
        reasons = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in counts.items() if k.startswith("rejected:"))
        raise NoPairsError(
            f"round {ctx.round_id} selected no preference pairs out of {counts['rows']} items ({reasons or 'none'}); "
            f"nothing to train on. Loosen the selection (select.margin, select.min_chosen_score, select.rule) or "
            f"draw more prompts, then rerun with --round {ctx.round_id} (the earlier stages are cached)")


@task(name="close-round")
def close_round(ctx: StageContext, config: RoundConfig, refs: dict[str, dict | None], promote: bool = True) -> dict:
    """Manifest with counts and hashes of every table, the registry entry of the new adapter, and the contact
    sheet (written next to the tables)."""
    read = {name: read_ref(ref) for name, ref in refs.items() if ref is not None}  # each table once
    tables = {name: {"path": refs[name]["path"], "rows": refs[name]["rows"], "hash": refs[name]["hash"],
                     "counts": table_counts(table)} for name, table in read.items()}
    sheet_image = contact_sheet(read["pairs"])
    sheet = None
    if sheet_image is not None:
        sheet = ctx.round_path / "contact_sheet.png"
        tmp = sheet.with_name(".contact_sheet.png.tmp")
        sheet_image.save(tmp, format="PNG")
        tmp.replace(sheet)
    adapter = str(ctx.round_path / "train" / "adapter")
    training = {}
    for row in read["train_history"].to_pylist():
        training[row["metric"]] = row["value"]  # rows are in step order: the last value of each metric
    manifest = {
        **store.read_manifest(ctx.round_path),
        "config": config.model_dump(mode="json"),
        "model": {"source": ctx.model, "adapters": list(ctx.adapters), "fingerprint": ctx.fingerprint},
        "code_version": _code_version(),
        "tables": tables,
        "adapter": adapter,
        "fingerprint_after": merged_fingerprint(ctx.fingerprint, adapter),
        "training": training,
        # the tokens selection, masks and training used (SelectConfig.token_source), and stage 1's shortfall
        "token_source": config.select.token_source,
        "prompt_shortfall": prompt_shortfall(read["prompts"], config.prompts),
        "contact_sheet": str(sheet) if sheet else None,
        "finished": _now(),
        "status": "finished",
    }
    store.write_manifest(ctx.round_path, manifest)
    store.register(Path(ctx.home), {
        "round_id": ctx.round_id,
        "model": ctx.model,
        "adapters": list(ctx.adapters),
        "adapter": adapter,
        "trained_from": ctx.fingerprint,
        "fingerprint": manifest["fingerprint_after"],
        "metrics": {"training": training},
        "promoted": promote,
        "decision": "promoted: no evaluation gate configured" if promote else "kept, not promoted",
        "created": manifest["finished"],
    })
    _end_attempts((ctx.round_path / "attempts").glob("*.json"), str(flow_run.get_id() or ""), "finished")
    store.unlock_round(ctx.round_path)
    return manifest
