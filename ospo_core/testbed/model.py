"""The testbed's tiny Janus: its image codebook is the world's cells and its image grid is the scene grid.

It is the built-in tiny model (`janus/tiny.py`) with two changes: the VQ codebook has `world.codebook_size` entries
(empty + colour x shape), so the generation head picks a cell content per image token, and the image is
`grid * 16` pixels, so the 16-pixel patches give exactly `grid x grid` image tokens. Its tokenizer also learns the
world's words. Everything else (chat template, sampler, scorer, trainer, loader) is the real model layer's.
"""

from __future__ import annotations

from ospo_core.janus.load import JanusBundle
from ospo_core.janus.tiny import build_tiny_janus
from ospo_core.testbed.world import WORLD, World, world_corpus

PATCH = 16  # pixels per image token side in the tiny config (4 VQ downsamplings)


def build_testbed_janus(world: World = WORLD, seed: int = 0, hidden_size: int = 128, num_layers: int = 4):
    """(model, processor) with random weights whose image tokens are the world's cells."""
    return build_tiny_janus(seed, image_size=world.grid * PATCH, codebook_size=world.codebook_size,
                            hidden_size=hidden_size, num_layers=num_layers, extra_corpus=world_corpus(world))


def check_testbed_model(bundle: JanusBundle, world: World = WORLD) -> None:
    """Refuse a model whose image tokens are not this world's cells (the oracle and the metric read them as such)."""
    if bundle.grid != world.grid or bundle.codebook_size != world.codebook_size:
        raise ValueError(
            f"model {bundle.source} draws {bundle.grid}x{bundle.grid} grids over {bundle.codebook_size} image tokens, "
            f"but the shapes world has {world.grid}x{world.grid} cells and {world.codebook_size} cell contents; use a "
            "checkpoint made by `ospo testbed` (ospo_core.testbed.pretrain) for this world"
        )
