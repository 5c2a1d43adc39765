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


# Line colours of the metrics plot: the overall line is black, categories cycle through these.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


def metrics_plot(labels: list[str], panels: dict[str, dict[str, list[float | None]]], promoted: list[bool | None],
                 title: str, note: str = "") -> Image.Image:
    """One panel per metric with a line per series ("overall" thick and black, then the categories) across the
    points `labels` (rounds). The overall marker is filled for a promoted round, hollow for one kept but not
    promoted, square for a point that is not a round's trained model. Missing values break the line.

    Drawn with PIL (no plotting library in the dependencies); axis ranges fit the data."""
    import textwrap

    width = max(640, 140 + 110 * len(labels) + 170)
    note_lines = textwrap.wrap(note, width=(width - 80) // 6)
    panel_h, top, left, right = 260, 30 + 14 * len(note_lines), 64, 170
    image = Image.new("RGB", (width, top + panel_h * len(panels) + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    for i, line in enumerate(note_lines):
        draw.text((left, 24 + 14 * i), line, fill="#555555")
    plot_w = width - left - right
    xs = [left + plot_w * (i + 0.5) / max(len(labels), 1) for i in range(len(labels))]
    for p, (metric, lines) in enumerate(panels.items()):
        y0, y1 = top + p * panel_h + 10, top + (p + 1) * panel_h - 40  # plot area, top and bottom
        values = [v for series in lines.values() for v in series if v is not None]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        pad = max((hi - lo) * 0.1, 0.01)
        lo, hi = lo - pad, hi + pad

        def y_of(v: float) -> float:
            return y1 - (v - lo) / (hi - lo) * (y1 - y0)

        draw.rectangle([left, y0, left + plot_w, y1], outline="#888888")
        for t in range(5):
            v = lo + (hi - lo) * t / 4
            draw.line([left, y_of(v), left + plot_w, y_of(v)], fill="#eeeeee")
            draw.text((4, y_of(v) - 6), f"{v:+.3f}", fill="#444444")
        draw.text((left + 4, y0 + 2), metric, fill="black")
        for i, label in enumerate(labels):
            shown = label if len(label) <= 20 else "..." + label[-17:]  # round ids differ at their end
            draw.text((xs[i] - 3 * len(shown), y1 + 6 + 12 * (i % 2)), shown, fill="#444444")
        # overall last, so its promotion markers sit on top of the category lines
        for n, (name, series) in reversed(list(enumerate(lines.items()))):
            colour = "black" if name == "overall" else _PALETTE[(n - 1) % len(_PALETTE)]
            wide = 3 if name == "overall" else 1
            for i in range(len(series) - 1):
                if series[i] is not None and series[i + 1] is not None:
                    draw.line([xs[i], y_of(series[i]), xs[i + 1], y_of(series[i + 1])], fill=colour, width=wide)
            for i, v in enumerate(series):
                if v is None:
                    continue
                r = 5 if name == "overall" else 3
                box = [xs[i] - r, y_of(v) - r, xs[i] + r, y_of(v) + r]
                if name != "overall" or promoted[i] is True:
                    draw.ellipse(box, fill=colour)
                elif promoted[i] is False:
                    draw.ellipse(box, fill="white", outline=colour, width=2)
                else:
                    draw.rectangle(box, fill=colour)
            legend_y = y0 + 14 * n
            draw.line([left + plot_w + 10, legend_y + 6, left + plot_w + 30, legend_y + 6], fill=colour, width=wide)
            draw.text((left + plot_w + 36, legend_y), name[:20], fill="black")
    return image
