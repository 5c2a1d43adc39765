"""The ablation table as text and as a plot (matplotlib), from the result rows of `ablation.run_ablation`.

Spread over seeds is shown as mean ± sample standard deviation and as [min, max]; with one seed only the mean.
"""

from __future__ import annotations

import statistics

from PIL import Image

from ospo_core.config import TESTBED_SETTINGS
from ospo_core.report import figure_image, new_figure
from ospo_core.testbed.world import CATEGORIES

# One colour per setting, in TESTBED_SETTINGS order, so a setting keeps its colour in every plot.
PALETTE = ["#787878", "#e67814", "#c8aa00", "#1e6edc", "#14a05a", "#be28a0"]


def _colour(setting: str) -> str:
    return PALETTE[list(TESTBED_SETTINGS).index(setting) % len(PALETTE)]


def _line(row: dict) -> tuple[str, str]:
    """A line of the table: (judge, setting); rows of results written before judges were a column are oracle's."""
    return row.get("judge", "oracle"), row["setting"]


def _label(line: tuple[str, str]) -> str:
    return f"{line[1]}, {line[0]}"


def _values(rows: list[dict], line: tuple[str, str], round_n: int, metric: str, category: str = "all") -> list:
    return [r[metric] for r in rows
            if _line(r) == line and r["round"] == round_n and r["category"] == category and r.get(metric) is not None]


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def _ordered(rows: list[dict], key: str) -> list:
    return list(dict.fromkeys(r[key] for r in rows))


def results_table(rows: list[dict]) -> str:
    """Markdown: exact-scene accuracy per round with gains, hallucination and recall, the judge's agreement with the
    oracle and the pairs selected per round, and per category after the last round; a line per (setting, judge)."""
    lines_, rounds = list(dict.fromkeys(_line(r) for r in rows)), sorted(_ordered(rows, "round"))
    seeds, last = _ordered(rows, "seed"), max(rounds)
    out = [f"Held-out exact-scene accuracy, all categories (mean ± sd over seeds {seeds}; round 0 = pre-trained "
           "start)", ""]
    out += ["| setting, judge | " + " | ".join(f"round {n}" for n in rounds) + " | gain (min..max over seeds) |",
            "|---" * (len(rounds) + 2) + "|"]
    for line in lines_:
        cells = [_spread(_values(rows, line, n, "exact")) for n in rounds]
        gains = [b - a for a, b in zip(_values(rows, line, 0, "exact"), _values(rows, line, last, "exact"))]
        gain = f"{statistics.mean(gains):+.3f} ({min(gains):+.3f}..{max(gains):+.3f})"
        out.append(f"| {_label(line)} | " + " | ".join(cells) + f" | {gain} |")
    out += ["", "Hallucination rate (objects drawn that the caption did not ask for) and object recall", "",
            "| setting, judge | " + " | ".join(f"halluc. r{n}" for n in rounds) + f" | recall r0 | recall r{last} |",
            "|---" * (len(rounds) + 3) + "|"]
    for line in lines_:
        cells = [_spread(_values(rows, line, n, "hallucination")) for n in rounds]
        recall = [_spread(_values(rows, line, n, "recall")) for n in (0, last)]
        out.append(f"| {_label(line)} | " + " | ".join(cells + recall) + " |")
    if any(r.get("judge_agreement") is not None for r in rows):
        out += ["", "The model's own judge: agreement with the oracle on 512 balanced held-out questions after each "
                "round (h), balanced agreement on the answers that chose the round's pairs (own images, self-judged "
                "rounds only), and the pairs selected per round (mean over seeds)", "",
                "| setting, judge | " + " | ".join(f"h r{n}" for n in rounds) + " | "
                + " | ".join(f"own r{n}" for n in rounds[1:]) + " | " + " | ".join(f"pairs r{n}" for n in rounds[1:])
                + " |", "|---" * (3 * len(rounds) - 1) + "|"]
        for line in lines_:
            mean = lambda vs, f: f.format(statistics.mean(vs)) if vs else "-"  # noqa: E731
            cells = [mean(_values(rows, line, n, "judge_agreement"), "{:.3f}") for n in rounds]
            cells += [mean(_values(rows, line, n, "round_agreement"), "{:.3f}") for n in rounds[1:]]
            cells += [mean(_values(rows, line, n, "pairs"), "{:.0f}") for n in rounds[1:]]
            out.append(f"| {_label(line)} | " + " | ".join(cells) + " |")
    categories = [c for c in CATEGORIES if any(r["category"] == c for r in rows)]
    out += ["", f"Exact-scene accuracy per category (mean over seeds): start and after round {last}", "",
            "| setting, judge | " + " | ".join(categories) + " | all |", "|---" * (len(categories) + 2) + "|"]
    for label, line, n in [("start", lines_[0], 0)] + [(_label(line), line, last) for line in lines_]:
        cells = [f"{statistics.mean(_values(rows, line, n, 'exact', c)):.3f}" for c in [*categories, "all"]]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    pairs = [r["pairs"] for r in rows if r["round"] > 0 and r["category"] == "all"]
    out += ["", f"Selected training pairs per round: {min(pairs)}..{max(pairs)}."]
    return "\n".join(out)


def results_plot(rows: list[dict], width: int = 1300, height: int = 430) -> Image.Image:
    """Panels over rounds: exact-scene accuracy, hallucination rate and (when measured) the model's own judge's
    agreement with the oracle; a line per (setting, judge) (mean over seeds) with a bar from the min to the max
    seed. `width` and `height` are in pixels."""
    lines_, rounds = list(dict.fromkeys(_line(r) for r in rows)), sorted(_ordered(rows, "round"))
    metrics = [("exact", "held-out exact-scene accuracy"), ("hallucination", "hallucination rate")]
    if any(r.get("judge_agreement") is not None for r in rows):
        metrics.append(("judge_agreement", "own judge: agreement with the oracle"))
    figure = new_figure(width, height)
    panels = figure.subplots(1, len(metrics))
    for axes, (metric, title) in zip(panels, metrics):
        axes.set_title(title, fontsize=9, loc="left")
        axes.set_xticks(rounds, ["start" if n == 0 else f"round {n}" for n in rounds], fontsize=8)
        axes.tick_params(axis="y", labelsize=8)
        axes.grid(axis="y", color="#eeeeee")
        for i, line in enumerate(lines_):
            shift = (i - (len(lines_) - 1) / 2) * 0.02 * max(1, rounds[-1] - rounds[0])  # keep seed bars apart
            spread = [_values(rows, line, n, metric) for n in rounds]
            means = [statistics.mean(vs) for vs in spread]
            below = [m - min(vs) for m, vs in zip(means, spread)]
            above = [max(vs) - m for m, vs in zip(means, spread)]
            # a setting keeps its colour; the oracle-judged line is solid, the self-judged one dashed
            axes.errorbar([n + shift for n in rounds], means, yerr=[below, above], color=_colour(line[1]),
                          marker="o", markersize=4, linewidth=2, elinewidth=1, capsize=0, label=_label(line),
                          linestyle="-" if line[0] == "oracle" else "--")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False,
                  title="bars: min..max seed", title_fontsize=7)
    return figure_image(figure)
