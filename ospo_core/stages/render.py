"""Stage 2c, rendering: one image per side for every dense (item, k) pair, both sides drawn with the same seed."""

from __future__ import annotations

import pyarrow as pa

from ospo_core.config import RenderConfig
from ospo_core.janus.image import sample_image_tokens
from ospo_core.records import DENSE, IMAGES, image_cell, to_table
from ospo_core.stages.common import ok_input_rows, row_seed

_READS = ["item_id", "t2i_category", "sub_category", "k", "dense_prompt", "negative_dense_prompt"]


def render(dense: pa.Table, tools, cfg: RenderConfig) -> pa.Table:
    """IMAGES rows: for each ok dense row, the base image (dense prompt) and the negative image (negative dense
    prompt), in that order; the dense prompts condition the images, as in the paper. The model samples the image
    tokens; `tools.decoder` turns them into the stored PNGs."""
    rows = ok_input_rows(dense, DENSE, _READS, table_name="dense", stage="render")
    jobs = []  # (row, side, prompt, seed)
    for row in rows:
        seed = row_seed(cfg.seed, row["item_id"], row["k"])
        jobs += [(row, "base", row["dense_prompt"], seed), (row, "negative", row["negative_dense_prompt"], seed)]
    if not jobs:
        return to_table([], IMAGES)
    sampled = sample_image_tokens(tools.model, [j[2] for j in jobs], cfg_weight=cfg.cfg_weight,
                                  temperature=cfg.temperature, seed=[j[3] for j in jobs], batch_size=cfg.batch_size,
                                  compile_mode=cfg.compile_mode)
    images = tools.decoder.decode(sampled)
    out = []
    for (row, side, prompt, seed), tokens, image in zip(jobs, sampled.tolist(), images):
        out.append({
            "item_id": row["item_id"], "t2i_category": row["t2i_category"], "sub_category": row["sub_category"],
            "side": side, "k": row["k"], "seed": seed, "prompt": prompt,
            "image": image_cell(image), "image_tokens": tokens, "ok": True,
        })
    return to_table(out, IMAGES)
