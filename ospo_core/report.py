"""Human-readable views of a round: counts per table, the contact sheet of chosen vs rejected images, a summary."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw

from ospo_core.records import decode_image

ROUND_TABLES = ("prompts", "negatives", "dense", "images", "questions", "vqa", "pairs", "masks", "train_history")


def table_counts(table: pa.Table) -> dict[str, int]:
    """rows, ok and rejected-by-reason counts (tables without `ok`, like train_history, report rows only)."""
    out = {"rows": table.num_rows}
    if "ok" not in table.column_names:
        return out
    out["ok"] = 0
    for ok, reason in zip(table.column("ok").to_pylist(), table.column("reason").to_pylist()):
        if ok:
            out["ok"] += 1
        else:
            out[f"rejected:{reason}"] = out.get(f"rejected:{reason}", 0) + 1
    return out


def contact_sheet(pairs: pa.Table, max_pairs: int = 8, cell: int = 128) -> Image.Image | None:
    """A grid: one line per selected pair, chosen image | rejected image | prompt and rejected prompt."""
    rows = [r for r in pairs.to_pylist() if r["ok"]][:max_pairs]
    if not rows:
        return None
    text_width = 3 * cell
    sheet = Image.new("RGB", (2 * cell + text_width, cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        for j, side in enumerate(("chosen", "rejected")):
            image = decode_image(row[side])
            if image is not None:
                sheet.paste(image.resize((cell, cell)), (j * cell, i * cell))
        lines = [f"{row['item_id']}  {row['sub_category']}", f"chosen:   {row['prompt']}",
                 f"rejected: {row['rejected_prompt']}"]
        for n, line in enumerate(lines):
            draw.text((2 * cell + 6, i * cell + 6 + 14 * n), line[:60], fill="black")
    return sheet


def summary_markdown(round_id: str, manifest: dict, training: dict[str, float], sheet: Path | None) -> str:
    lineage = manifest.get("model", {})
    lines = [
        f"# OSPO round `{round_id}`",
        "",
        f"- start model: `{lineage.get('source')}` + {len(lineage.get('adapters', []))} adapter(s), "
        f"fingerprint `{lineage.get('fingerprint')}`",
        f"- new adapter: `{manifest.get('adapter')}` (model fingerprint `{manifest.get('fingerprint_after')}`)",
        f"- round folder: `{manifest.get('path')}`",
        "",
        "| table | rows | ok | rejected (by reason) | Parquet |",
        "|---|---|---|---|---|",
    ]
    for name, info in manifest.get("tables", {}).items():
        c = info["counts"]
        rejected = ", ".join(f"{k.split(':', 1)[1]}: {v}" for k, v in c.items() if k.startswith("rejected:")) or "-"
        lines.append(f"| {name} | {c['rows']} | {c.get('ok', '-')} | {rejected} | `{info['path']}` |")
    if training:
        lines += ["", "| training metric (last logged) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(training.items())]
    if sheet is not None:
        lines += ["", f"Contact sheet (chosen | rejected): [{sheet}]({sheet.as_uri()})"]
    return "\n".join(lines)
