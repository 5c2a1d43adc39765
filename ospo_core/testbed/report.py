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


def _values(rows: list[dict], setting: str, round_n: int, metric: str, category: str = "all") -> list[float]:
    return [r[metric] for r in rows if r["setting"] == setting and r["round"] == round_n and r["category"] == category]


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def _ordered(rows: list[dict], key: str) -> list:
    return list(dict.fromkeys(r[key] for r in rows))


def results_table(rows: list[dict]) -> str:
    """Markdown: exact-scene accuracy and hallucination per round, gains, and per category after the last round."""
    settings, rounds = _ordered(rows, "setting"), sorted(_ordered(rows, "round"))
    seeds, last = _ordered(rows, "seed"), max(rounds)
    lines = [f"Held-out exact-scene accuracy, all categories (mean ± sd over seeds {seeds}; round 0 = pre-trained "
             "start)", ""]
    lines += ["| setting | " + " | ".join(f"round {n}" for n in rounds) + " | gain (min..max over seeds) |",
              "|---" * (len(rounds) + 2) + "|"]
    for s in settings:
        cells = [_spread(_values(rows, s, n, "exact")) for n in rounds]
        gains = [b - a for a, b in zip(_values(rows, s, 0, "exact"), _values(rows, s, last, "exact"))]
        gain = f"{statistics.mean(gains):+.3f} ({min(gains):+.3f}..{max(gains):+.3f})"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {gain} |")
    lines += ["", "Hallucination rate (objects drawn that the caption did not ask for) and object recall", "",
              "| setting | " + " | ".join(f"halluc. r{n}" for n in rounds) + f" | recall r0 | recall r{last} |",
              "|---" * (len(rounds) + 3) + "|"]
    for s in settings:
        cells = [_spread(_values(rows, s, n, "hallucination")) for n in rounds]
        recall = [_spread(_values(rows, s, n, "recall")) for n in (0, last)]
        lines.append(f"| {s} | " + " | ".join(cells + recall) + " |")
    categories = [c for c in CATEGORIES if any(r["category"] == c for r in rows)]
    lines += ["", f"Exact-scene accuracy per category (mean over seeds): start and after round {last}", "",
              "| setting | " + " | ".join(categories) + " | all |", "|---" * (len(categories) + 2) + "|"]
    for label, s, n in [("start", settings[0], 0)] + [(s, s, last) for s in settings]:
        cells = [f"{statistics.mean(_values(rows, s, n, 'exact', c)):.3f}" for c in [*categories, "all"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    pairs = [r["pairs"] for r in rows if r["round"] > 0 and r["category"] == "all"]
    lines += ["", f"Selected training pairs per round: {min(pairs)}..{max(pairs)}."]
    return "\n".join(lines)


def results_plot(rows: list[dict], width: int = 980, height: int = 430) -> Image.Image:
    """Two panels over rounds: exact-scene accuracy and hallucination rate; a line per setting (mean over seeds)
    with a bar from the min to the max seed. `width` and `height` are in pixels."""
    settings, rounds = _ordered(rows, "setting"), sorted(_ordered(rows, "round"))
    figure = new_figure(width, height)
    panels = figure.subplots(1, 2)
    for axes, (metric, title) in zip(panels, [("exact", "held-out exact-scene accuracy"),
                                              ("hallucination", "hallucination rate")]):
        axes.set_title(title, fontsize=9, loc="left")
        axes.set_xticks(rounds, ["start" if n == 0 else f"round {n}" for n in rounds], fontsize=8)
        axes.tick_params(axis="y", labelsize=8)
        axes.grid(axis="y", color="#eeeeee")
        for i, s in enumerate(settings):
            shift = (i - (len(settings) - 1) / 2) * 0.02 * max(1, rounds[-1] - rounds[0])  # keep seed bars apart
            spread = [_values(rows, s, n, metric) for n in rounds]
            means = [statistics.mean(vs) for vs in spread]
            below = [m - min(vs) for m, vs in zip(means, spread)]
            above = [max(vs) - m for m, vs in zip(means, spread)]
            axes.errorbar([n + shift for n in rounds], means, yerr=[below, above], color=_colour(s), marker="o",
                          markersize=4, linewidth=2, elinewidth=1, capsize=0, label=s)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False,
                  title="bars: min..max seed", title_fontsize=7)
    return figure_image(figure)
