"""Draw shapes-world token grids as pictures: the testbed's PNGs (`RenderConfig.decoder = "testbed"`) and sheets.

The testbed model's VQ decoder is never trained (its image tokens are scene cells, not learned codes), so its PNGs
would be noise; these drawings show what the tokens mean. Colours are PIL colour names, shapes are drawn inside
their cells with a margin, empty cells stay white with a light grid.
"""

from __future__ import annotations

from PIL import Image, ImageColor, ImageDraw

from ospo_core.testbed.world import WORLD, World

GRID_LINE = (220, 220, 220)
BORDER = (128, 128, 128)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=fill)
    else:
        raise ValueError(f"no drawing for shape {shape!r}; the renderer draws square, circle, triangle and diamond")


def draw_scene(tokens: list[int], world: World = WORLD, cell: int = 16) -> Image.Image:
    """A token grid -> an RGB picture of `grid * cell` pixels square."""
    size = world.grid * cell
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i in range(1, world.grid):
        draw.line([(i * cell, 0), (i * cell, size)], fill=GRID_LINE)
        draw.line([(0, i * cell), (size, i * cell)], fill=GRID_LINE)
    draw.rectangle((0, 0, size - 1, size - 1), outline=BORDER)  # so scenes side by side in a sheet stay apart
    margin = max(1, cell // 8)
    for kind, (row, col) in world.objects(tokens):
        box = (col * cell + margin, row * cell + margin, (col + 1) * cell - margin - 1, (row + 1) * cell - margin - 1)
        _draw_shape(draw, kind.shape, box, ImageColor.getrgb(kind.colour))
    return image


def scene_sheet(
    rows: list[tuple[str, list[tuple[str, list[int]]]]], world: World = WORLD, cell: int = 24, max_text_width: int = 300
) -> Image.Image:
    """A labelled grid of scenes: one line per (caption, [(label, tokens), ...]), each scene with its label above.
    The caption column is as wide as the longest caption, up to `max_text_width` pixels (longer ones are cut)."""
    scene = world.grid * cell
    label_height = 14
    columns = max(len(scenes) for _, scenes in rows)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = min(max_text_width, 12 + max(int(measure.textlength(caption)) for caption, _ in rows))
    sheet = Image.new("RGB", (text_width + columns * (scene + 8), len(rows) * (scene + label_height + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (caption, scenes) in enumerate(rows):
        top = r * (scene + label_height + 8)
        while caption and draw.textlength(caption) > text_width - 8:
            caption = caption[:-1]
        draw.text((4, top + label_height + scene // 2 - 6), caption, fill="black")
        for c, (label, tokens) in enumerate(scenes):
            left = text_width + c * (scene + 8)
            draw.text((left, top), label, fill="black")
            sheet.paste(draw_scene(tokens, world, cell), (left, top + label_height))
    return sheet
