"""Stage 2b: densification (spec section 2b).

One call per ok negative row writes the dense (long) version of the base prompt and of that negative together, so
both share a scene and differ where the short prompts differ. The answers are the rest of the
`Step 2. Prompt 1 Dense:` and `Step 4. Prompt 2 Dense:` lines; if either is missing or bad, both fail. Row (item, k)
is sampled with seed row_seed(cfg.seeds[k], item_id), the per-index seeds of stage 2a.

fallback="structured" uses the short prompts themselves as their dense versions (source="fallback"): the images are
then conditioned on the short prompts, which is what a model that cannot densify can honestly offer.
"""

from __future__ import annotations

import pyarrow as pa

from ospo_core.config import DensifyConfig
from ospo_core.records import DENSE, NEGATIVES, to_table
from ospo_core.stages.common import ok_input_rows, row_seed, write_texts
from ospo_core.templates import dense_chat
from ospo_core.templates.parse import ParseError, parse_dense

COLUMNS = ["item_id", "t2i_category", "sub_category", "k", "prompt", "negative_prompt"]


def densify(negatives: pa.Table, tools, cfg: DensifyConfig) -> pa.Table:
    """NEGATIVES (its ok rows) -> DENSE, one row per (item, k), written by `tools.writer`."""
    pairs = ok_input_rows(negatives, NEGATIVES, COLUMNS, table_name="negatives", stage="densify")
    for pair in pairs:
        if not 0 <= pair["k"] < len(cfg.seeds):
            raise ValueError(f"densify: negative {pair['item_id']} has k={pair['k']}, but seeds cover k = 0.."
                             f"{len(cfg.seeds) - 1}; pass the table written by perturb")
    seeds = [row_seed(cfg.seeds[p["k"]], p["item_id"]) for p in pairs]
    return tools.writer.dense(pairs, seeds, cfg)


def write_dense(bundle, pairs: list[dict], seeds: list[int], cfg: DensifyConfig) -> pa.Table:
    """The paper's writer: one chat per (item, k) writes both dense prompts; a failed parse fails both."""
    outputs = write_texts(bundle, [dense_chat(p["sub_category"], p["prompt"], p["negative_prompt"]) for p in pairs],
                          seeds, cfg, "dense rewrites")
    rows = []
    for pair, seed, text in zip(pairs, seeds, outputs):
        row = {**pair, "seed": seed, "raw_output": text, "source": "model"}
        try:
            dense, negative_dense = parse_dense(text)
            row.update(dense_prompt=dense, negative_dense_prompt=negative_dense, ok=True)
        except ParseError as error:
            if cfg.fallback == "structured":
                row.update(dense_prompt=pair["prompt"], negative_dense_prompt=pair["negative_prompt"],
                           source="fallback", ok=True)
            else:
                row.update(ok=False, reason=error.reason)
        rows.append(row)
    return to_table(rows, DENSE)
