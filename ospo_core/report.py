"""Human-readable views of a round: counts per table, the contact sheet of chosen vs rejected images, a summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
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


def summary_markdown(round_id: str, manifest: dict, training: dict[str, float], *, preset: str = "",
                     scale: str = "", seconds: float | None = None, images: dict[str, str] | None = None,
                     estimate: str = "", url: Callable[[str], str | None] = lambda path: None) -> str:
    """The round at a glance: model, preset and scale, lineage, counts per table with where its Parquet files are,
    the last training metrics, the wall time `ospo estimate` projects for it (`estimate`, its text; one device)
    beside the measured one, and `images` (title -> markdown image, e.g. `embed(...)`) under their titles.
    `url(path)` gives an http(s) address of a file or folder where one is served (None: the path is shown)."""
    lineage = manifest.get("model", {})
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    lines = [
        f"# OSPO round `{round_id}`: {manifest.get('status', '')}{took}",
        "",
        f"- model: `{lineage.get('source')}` + {len(lineage.get('adapters', []))} adapter(s), "
        f"fingerprint `{lineage.get('fingerprint')}`",
        f"- preset: {preset or 'custom'}; scale: {scale}",
        f"- new adapter: {_where(manifest.get('adapter'), url)} (model fingerprint `{manifest.get('fingerprint_after')}`)",
        f"- round folder: {_where(manifest.get('path'), url)}",
        "",
        "| table | rows | ok | rejected (by reason) | Parquet |",
        "|---|---|---|---|---|",
    ]
    for name, info in manifest.get("tables", {}).items():
        c = info["counts"]
        rejected = ", ".join(f"{k.split(':', 1)[1]}: {v}" for k, v in c.items() if k.startswith("rejected:"))
        lines.append(f"| {name} | {c['rows']} | {c.get('ok', '')} | {rejected} | {_where(info['path'], url)} |")
    shortfall = manifest.get("prompt_shortfall")
    if shortfall:  # stage 1 stops after its draw budget; the spec draws until every quota is met
        lines += ["", "Stage 1 fell short of its quota (draw budget spent), accepted/wanted: " + ", ".join(
            f"{sub} {v['accepted']}/{v['wanted']}" for sub, v in shortfall.items())]
    shown = [k for k in SUMMARY_METRICS if k in training]
    if shown:
        lines += ["", "| training metric (last logged; all in train_history) | value |", "|---|---|"]
        lines += [f"| {k} | {training[k]:.4g} |" for k in shown]
    if estimate:
        lines += ["", f"**Wall time `ospo estimate` projects for this round** (measured{took or ': -'})", "",
                  "```", estimate, "```"]
    for title, image in (images or {}).items():
        lines += ["", f"**{title}**", "", image]
    return "\n".join(lines)


# The training metrics a summary shows, in the order a person checks them.
SUMMARY_METRICS = ("loss", "loss/preference", "loss/conditional", "loss/sft", "rewards/accuracies", "rewards/margins",
                   "rewards/conditional_margin", "nll/chosen", "eval_loss", "eval_rewards/accuracies",
                   "eval_rewards/margins", "pairs/train", "pairs/validation", "pairs/skipped_no_mask", "train_runtime")


def round_scale(config) -> str:
    """How big a round is, in the numbers that set its cost (a RoundConfig)."""
    prompts = sum(config.prompts.quota_for(key) for key in config.prompts.sub_categories)
    budgets = sorted({c.max_new_tokens for c in (config.prompts, config.perturb, config.densify, config.questions)})
    return (f"{prompts:,} prompts wanted in {len(config.prompts.sub_categories)} sub-categories (3 negatives each), "
            f"text budgets {'/'.join(map(str, budgets))} tokens, {config.train.max_steps:,} training steps")


def _where(path: str | None, url: Callable[[str], str | None]) -> str:
    link = url(path) if path else None
    return f"[{Path(path).name}]({link})" if link else f"`{path}`"


# Thumbnails are embedded in markdown artifacts as data URIs: the UI cannot reach files on a worker's disk, and the
# browser refuses file:// links. Small caps keep an artifact (stored in the Prefect database) well under a megabyte.
THUMBNAIL_PX = 96
EMBED_MAX_BYTES = 150_000


def embed(image: Image.Image, alt: str, max_px: int = THUMBNAIL_PX, max_bytes: int = EMBED_MAX_BYTES) -> str:
    """A markdown image whose source is the PNG itself (`data:image/png;base64,...`), downscaled so that its longer
    side is at most `max_px` and halved again until the PNG fits in `max_bytes`."""
    import base64
    import io

    image = image.convert("RGB")
    scale = min(1.0, max_px / max(image.size))
    while True:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.LANCZOS).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_bytes or max(size) <= 16:
            break
        scale /= 2
    alt = alt.replace("[", "(").replace("]", ")").replace("\n", " ")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def cell_text(value, limit: int = 160) -> str:
    """A table cell: one line, no pipes, cut at `limit` characters."""
    text = " ".join(str("" if value is None else value).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pairs_sheet(pairs: pa.Table) -> Image.Image | None:
    """The contact sheet at thumbnail size (4 pairs, 64-pixel cells: the tiny model's own resolution) for the UI."""
    return contact_sheet(pairs, max_pairs=4, cell=64)


def images_markdown(images: pa.Table, max_rows: int = 6) -> str:
    """Sampled images (render) with the prompt each was drawn from, side and perturbation index: both sides of the
    first items' first negative, so the pictures span several prompts."""
    first = images.filter(pc.equal(images.column("k"), 0))
    rows = (first if first.num_rows else images).slice(0, max_rows).select(["item_id", "side", "k", "prompt", "image"])
    rows = rows.to_pylist()
    lines = ["| image | item | side | k | prompt |", "|---|---|---|---|---|"]
    for row in rows:
        image = decode_image(row["image"])
        cell = embed(image, row["prompt"] or "") if image is not None else "(no image)"
        lines.append(f"| {cell} | {row['item_id']} | {row['side']} | {row['k']} | {cell_text(row['prompt'])} |")
    return "\n".join(lines)


def vqa_markdown(vqa: pa.Table, images: pa.Table, max_images: int = 2) -> str:
    """Self-VQA at a glance: an image, then each question asked about it with p_yes, p_no and the answer."""
    asked: dict[tuple, list[dict]] = {}
    for row in vqa.select(["item_id", "side", "k", "question_set", "question", "p_yes", "p_no", "answer"]).to_pylist():
        key = (row["item_id"], row["side"], row["k"])
        if key in asked or len(asked) < max_images:
            asked.setdefault(key, []).append(row)
    wanted = {(r["item_id"], r["side"], r["k"]): r for r in images.select(["item_id", "side", "k", "prompt", "image"])
              .to_pylist() if (r["item_id"], r["side"], r["k"]) in asked}
    parts = []
    for key, questions in asked.items():
        row = wanted.get(key)
        image = decode_image(row["image"]) if row else None
        parts += [f"{embed(image, row['prompt'] or '') if image is not None else '(no image)'}", "",
                  f"item {key[0]}, {key[1]} image, k = {key[2]}: {cell_text(row['prompt'] if row else '')}", "",
                  "| questions of | question | p_yes | p_no | answer |", "|---|---|---|---|---|"]
        parts += [f"| {q['question_set']} | {cell_text(q['question'])} | {_number(q['p_yes'])} | "
                  f"{_number(q['p_no'])} | {q['answer'] or ''} |" for q in questions]
        parts.append("")
    return "\n".join(parts)


def _number(value) -> str:
    return "" if value is None else f"{value:.3f}"


def eval_markdown(table: pa.Table, max_images: int = 4) -> str:
    """An evaluation at a glance: mean local score per category as bars, then sample images with their prompt,
    score and answers."""
    from ospo_core.evaluate import eval_metrics  # the metrics table's own numbers (ok rows), not a second count

    scores = {name: m.mean_score for name, m in eval_metrics(table).categories.items() if m.mean_score is not None}
    parts = []
    if scores:
        names = sorted(scores)
        means = [scores[n] for n in names]
        figure = new_figure(480, 60 + 22 * len(names))
        axes = figure.subplots()
        axes.barh(names, means, color="C0")
        axes.set_xlim(-1, 1)
        axes.axvline(0, color="black", linewidth=0.8)
        axes.set_xlabel("mean local score (p_yes - p_no), self-judged", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.invert_yaxis()
        parts += [embed(figure_image(figure), "mean score per category", max_px=480), ""]
    parts += ["| image | category | prompt | score | all yes |", "|---|---|---|---|---|"]
    for row in table.slice(0, max_images).select(["category", "prompt", "image", "score", "all_yes"]).to_pylist():
        image = decode_image(row["image"])
        cell = embed(image, row["prompt"] or "") if image is not None else "(no image)"
        parts.append(f"| {cell} | {row['category']} | {cell_text(row['prompt'])} | {_number(row['score'])} | "
                     f"{'' if row['all_yes'] is None else ('yes' if row['all_yes'] else 'no')} |")
    return "\n".join(parts)


# Training curves: one panel per group of metrics, in the order a person checks them.
CURVE_PANELS = {
    "loss terms": ("loss", "loss/preference", "loss/conditional", "loss/sft"),
    "margins": ("rewards/margins", "rewards/conditional_margin"),
    "chosen NLL": ("nll/chosen",),
}


def training_curves(history: pa.Table) -> Image.Image | None:
    """The loss terms, the reward margins and the chosen-image NLL against the optimizer step (from the
    train_history table); None when nothing was logged."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step, metric, value in zip(history.column("step").to_pylist(), history.column("metric").to_pylist(),
                                   history.column("value").to_pylist()):
        if value is not None:
            xs, ys = series.setdefault(metric, ([], []))
            xs.append(step)
            ys.append(value)
    panels = {title: [m for m in metrics if m in series] for title, metrics in CURVE_PANELS.items()}
    panels = {title: metrics for title, metrics in panels.items() if metrics}
    if not panels:
        return None
    figure = new_figure(300 * len(panels), 260)
    for axes, (title, metrics) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        axes.set_title(title, fontsize=9, loc="left")
        axes.set_xlabel("optimizer step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(color="#eeeeee")
        for n, metric in enumerate(metrics):
            axes.plot(*series[metric], marker="o", markersize=2, linewidth=1.2, label=metric, color=f"C{n}")
            if f"eval_{metric}" in series:  # validation on the held-out pairs, dashed in the same colour
                axes.plot(*series[f"eval_{metric}"], marker="s", markersize=3, linewidth=1, linestyle="--",
                          label=f"validation {metric}", color=f"C{n}")
        axes.legend(fontsize=7, frameon=False)
    return figure_image(figure)


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
