"""The two bookends of a round: open it (folder, model, lineage) and close it (manifest, registry, summary)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from ospo_core import store
from ospo_core.config import RoundConfig
from ospo_core.janus.load import load_janus, merged_fingerprint
from ospo_core.report import contact_sheet, summary_markdown, table_counts
from tasks.common import _BUNDLES, StageContext, now_id, read_ref
from tasks.stages import artifact_key


@task(name="open-round")
def open_round(config: RoundConfig, home: str | None = None) -> StageContext:
    """Create the round folder, load the start model (base + earlier adapters) and record the lineage."""
    home_path = Path(home) if home else store.ospo_home()
    round_id = store.check_round_id(config.round_id or now_id())
    bundle = load_janus(config.model, adapters=tuple(config.adapters))
    _BUNDLES.clear()
    _BUNDLES[(config.model, tuple(config.adapters))] = bundle
    ctx = StageContext(round_id=round_id, home=str(home_path), model=config.model, adapters=tuple(config.adapters),
                       fingerprint=bundle.fingerprint, shard_rows=config.shard_rows, execution=config.execution)
    store.lock_round(ctx.round_path)  # held until close_round (or this process ends)
    previous = store.read_manifest(ctx.round_path) if (ctx.round_path / "manifest.json").is_file() else {}
    store.write_manifest(ctx.round_path, {
        **previous,
        "round_id": round_id,
        "path": str(ctx.round_path),
        "config": config.model_dump(mode="json"),
        "model": {"source": config.model, "adapters": list(config.adapters), "fingerprint": bundle.fingerprint},
        "code_version": _code_version(),
        "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
        "status": "running",
    })
    get_run_logger().info("round %s in %s, model %s (fingerprint %s)", round_id, ctx.round_path, config.model,
                          bundle.fingerprint)
    return ctx


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ospo")
    except PackageNotFoundError:
        return "unknown"


@task(name="close-round")
def close_round(ctx: StageContext, refs: dict[str, dict | None], trained: dict, promote: bool = True) -> dict:
    """Manifest with counts and hashes of every table, the registry entry of the new adapter, the summary artifact
    and the contact sheet (written next to the tables and linked from the summary)."""
    tables = {}
    for name, ref in refs.items():
        if ref is not None:
            tables[name] = {"path": ref["path"], "rows": ref["rows"], "hash": ref["hash"],
                            "counts": table_counts(read_ref(ref))}
    sheet_image = contact_sheet(read_ref(refs["pairs"]))
    sheet = None
    if sheet_image is not None:
        sheet = ctx.round_path / "contact_sheet.png"
        tmp = sheet.with_name(".contact_sheet.png.tmp")
        sheet_image.save(tmp, format="PNG")
        tmp.replace(sheet)
    adapter = trained["adapter"]
    manifest = {
        **store.read_manifest(ctx.round_path),
        "tables": tables,
        "adapter": adapter,
        "fingerprint_after": merged_fingerprint(ctx.fingerprint, adapter),
        "training": trained.get("final_metrics", {}),
        "contact_sheet": str(sheet) if sheet else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
        "metrics": {"training": manifest["training"]},
        "promoted": promote,
        "decision": "promoted: no evaluation gate configured" if promote else "kept, not promoted",
        "created": manifest["finished"],
    })
    store.unlock_round(ctx.round_path)
    create_markdown_artifact(key=artifact_key(ctx, "summary"),
                             markdown=summary_markdown(ctx.round_id, manifest, manifest["training"], sheet),
                             description=f"OSPO round {ctx.round_id}")
    return manifest
