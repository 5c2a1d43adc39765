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


def new_figure(width_px: int, height_px: int, dpi: int = 100):
    """A matplotlib Figure on the Agg canvas, outside pyplot: no global figure registry, safe in worker threads,
    never a window. matplotlib is imported here so that importing this module stays cheap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_image(figure) -> Image.Image:
    """Render a figure from `new_figure` to an RGB PIL image (callers save it as PNG, or embed it)."""
    figure.canvas.draw()
    rgba = figure.canvas.buffer_rgba()
    return Image.frombuffer("RGBA", figure.canvas.get_width_height(), rgba, "raw", "RGBA", 0, 1).convert("RGB")


def metrics_plot(labels: list[str], panels: dict[str, dict[str, list[float | None]]], promoted: list[bool | None],
                 title: str, note: str = "") -> Image.Image:
    """One panel per metric with a line per series ("overall" thick and black, then the categories) across the
    points `labels` (rounds). The overall marker is filled for a promoted round, hollow for one kept but not
    promoted, square for a point that is not a round's trained model. Missing values break the line."""
    import textwrap

    width = max(640, 140 + 110 * len(labels) + 170)
    note = "\n".join(textwrap.wrap(note, width=(width - 80) // 7))
    figure = new_figure(width, 60 + 16 * note.count("\n") + 260 * len(panels))
    figure.suptitle(f"{title}\n{note}" if note else title, fontsize=9, ha="left", x=0.01)
    xs = range(len(labels))
    # round ids differ at their end, so long ones keep it
    ticks = [label if len(label) <= 20 else "..." + label[-17:] for label in labels]
    for axes, (metric, lines) in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0], panels.items()):
        axes.set_title(metric, fontsize=9, loc="left")
        axes.grid(axis="y", color="#eeeeee")
        axes.set_xticks(list(xs), ticks, fontsize=7, rotation=20, ha="right")
        axes.tick_params(axis="y", labelsize=7)
        for n, (name, series) in enumerate(lines.items()):
            values = [float("nan") if v is None else v for v in series]  # NaN breaks the line
            if name != "overall":
                axes.plot(xs, values, marker="o", markersize=3, linewidth=1, color=f"C{(n - 1) % 10}", label=name[:20])
                continue
            axes.plot(xs, values, linewidth=3, color="black", label=name, zorder=3)  # above the categories
            for decided, style in ((True, {"facecolor": "black"}), (False, {"facecolor": "white"}),
                                   (None, {"facecolor": "black", "marker": "s"})):
                at = [i for i, v in enumerate(series) if v is not None and promoted[i] is decided]
                axes.scatter(at, [series[i] for i in at], s=40, edgecolors="black", linewidths=1.5, zorder=4,
                             **{"marker": "o", **style})
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure_image(figure)
