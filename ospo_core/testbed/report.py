"""The ablation table as text and as a plot (PIL only), from the result rows of `ablation.run_ablation`.

Spread over seeds is shown as mean ± sample standard deviation and as [min, max]; with one seed only the mean.
"""

from __future__ import annotations

import statistics

from PIL import Image, ImageDraw

from ospo_core.config import TESTBED_SETTINGS
from ospo_core.testbed.world import CATEGORIES

# One colour per setting, in TESTBED_SETTINGS order, so a setting keeps its colour in every plot.
PALETTE = [(120, 120, 120), (230, 120, 20), (200, 170, 0), (30, 110, 220), (20, 160, 90), (190, 40, 160)]


def _colour(setting: str) -> tuple[int, int, int]:
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
    with a bar from the min to the max seed."""
    settings, rounds = _ordered(rows, "setting"), sorted(_ordered(rows, "round"))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    legend = 150
    panel = (width - legend) // 2
    for p, (metric, title) in enumerate([("exact", "held-out exact-scene accuracy"),
                                         ("hallucination", "hallucination rate")]):
        left, top, right, bottom = p * panel + 50, 30, (p + 1) * panel - 15, height - 40
        values = [v for s in settings for n in rounds for v in _values(rows, s, n, metric)]
        low, high = min(values), max(values)
        pad = max(0.02, 0.1 * (high - low))
        low, high = max(0.0, low - pad), min(1.0, high + pad)

        def x(n: int) -> float:
            return left + (right - left) * (n - rounds[0]) / max(1, rounds[-1] - rounds[0])

        def y(v: float) -> float:
            return bottom - (bottom - top) * (v - low) / (high - low)

        draw.text((left, 8), title, fill="black")
        draw.rectangle((left, top, right, bottom), outline="black")
        for i in range(5):
            v = low + (high - low) * i / 4
            draw.line([(left - 4, y(v)), (left, y(v))], fill="black")
            draw.text((left - 44, y(v) - 6), f"{v:.2f}", fill="black")
        for n in rounds:
            draw.text((x(n) - 16, bottom + 6), "start" if n == 0 else f"round {n}", fill="black")
        for i, s in enumerate(settings):
            colour = _colour(s)
            shift = (i - (len(settings) - 1) / 2) * 3  # keep the seed bars of the settings apart
            points = []
            for n in rounds:
                vs = _values(rows, s, n, metric)
                px = x(n) + shift
                draw.line([(px, y(min(vs))), (px, y(max(vs)))], fill=colour, width=1)
                points.append((px, y(statistics.mean(vs))))
            draw.line(points, fill=colour, width=2)
            for px, py in points:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
    for i, s in enumerate(settings):
        colour = _colour(s)
        draw.line([(width - legend + 10, 40 + 18 * i), (width - legend + 30, 40 + 18 * i)], fill=colour, width=3)
        draw.text((width - legend + 36, 33 + 18 * i), s, fill="black")
    draw.text((width - legend + 10, 40 + 18 * len(settings)), "bars: min..max seed", fill="gray")
    return image
