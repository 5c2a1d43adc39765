"""The pairs table -> a training dataset and the collator that builds the concatenated 3B-row batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import torch

from ospo_core.config import TrainConfig
from ospo_core.janus.chat import generation_prompt
from ospo_core.janus.load import JanusBundle
from ospo_core.janus.score import check_image_tokens
from ospo_core.records import ok_rows
from ospo_core.train.loss import object_weights

if TYPE_CHECKING:
    from datasets import Dataset

REQUIRED = ("item_id", "prompt", "rejected_prompt", "chosen", "rejected", "chosen_tokens", "rejected_tokens", "ok")


def pairs_to_dataset(
    pairs: pa.Table, bundle: JanusBundle, cfg: TrainConfig, masks: pa.Table | None = None
) -> Dataset:
    """Selected pairs -> rows of (prompt, rejected_prompt, chosen_tokens, rejected_tokens[, *_weights]).

    The token ids are the pairs table's: the ones the selection scored (sampled, or the PNGs re-encoded, per
    `SelectConfig.token_source`), checked against the model's codebook and grid, so a pairs table made by another
    model is refused. With object weighting, a pair without both object masks is skipped (spec section 6):
    `skipped_without_masks(pairs, masks)` counts them.
    """
    missing = [c for c in REQUIRED if c not in pairs.column_names]
    if missing:
        raise ValueError(f"pairs table lacks column(s) {missing}; it must come from the select stage (records.PAIRS)")
    pairs = ok_rows(pairs)
    if pairs.num_rows == 0:
        raise ValueError(
            "pairs table has no selected (ok) pairs to train on; look at the select stage's rejection reasons "
            "(e.g. relax select.margin, generate more prompts, or use fallback: structured on the tiny model)"
        )
    rows = pairs.to_pylist()
    if cfg.object_weighting:
        masked = _masked_items(masks)
        rows = [r for r in rows if r["item_id"] in masked]
        if not rows:
            raise ValueError("object_weighting is on but no pair has both object masks; look at the masks stage's "
                             "rejection reasons, or train without object weighting")
    chosen = check_image_tokens(bundle, [r["chosen_tokens"] for r in rows])
    rejected = check_image_tokens(bundle, [r["rejected_tokens"] for r in rows])
    data = {
        "item_id": [r["item_id"] for r in rows],
        "prompt": [r["prompt"] for r in rows],
        "rejected_prompt": [r["rejected_prompt"] for r in rows],
        "chosen_tokens": chosen.tolist(),
        "rejected_tokens": rejected.tolist(),
    }
    if cfg.object_weighting:
        data["chosen_weights"], data["rejected_weights"] = _mask_weights(rows, masks, bundle.grid, cfg)
    from datasets import Dataset  # here, not at the top: the collator and benchmarks (bench/gpu.sh) run without it

    return Dataset.from_dict(data)


def _masked_items(masks: pa.Table | None) -> set[str]:
    """Items whose chosen and rejected images both have an ok object mask."""
    if masks is None:
        raise ValueError("object_weighting is on but no masks table was given; run the masks stage first")
    sides: dict[str, set[str]] = {}
    for m in ok_rows(masks).select(["item_id", "side"]).to_pylist():
        sides.setdefault(m["item_id"], set()).add(m["side"])
    return {item for item, found in sides.items() if found >= {"chosen", "rejected"}}


def skipped_without_masks(pairs: pa.Table, masks: pa.Table | None) -> int:
    """How many ok pairs object weighting skips because a mask is missing."""
    masked = _masked_items(masks)
    return sum(item not in masked for item in ok_rows(pairs).column("item_id").to_pylist())


def _mask_weights(rows, masks: pa.Table, grid: int, cfg: TrainConfig):
    by_key = {(m["item_id"], m["side"]): m["mask"] for m in ok_rows(masks).to_pylist()}
    out = []
    for side in ("chosen", "rejected"):
        grids = torch.tensor([by_key[(r["item_id"], side)] for r in rows]).view(-1, grid, grid)
        out.append(object_weights(grids, alpha=cfg.mask_alpha, gamma=cfg.mask_gamma).tolist())
    return out


def tokenize_prompts(example: dict, processor) -> dict:
    """Gen-prompt token ids of the short base prompt x_c and the short rejected prompt x_r."""
    ids = lambda text: processor.tokenizer(generation_prompt(processor, text))["input_ids"]  # noqa: E731
    return {"prompt_ids": ids(example["prompt"]), "rejected_prompt_ids": ids(example["rejected_prompt"])}


@dataclass
class OSPOCollator:
    """B pairs -> one batch of 3B rows: (x_c, y_w), (x_c, y_l), (x_r, y_w), prompts left-padded.

    Left padding puts every <begin_of_image> at the same column, so the image positions are the last N columns of
    every row and the loss reads logits there only.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples] * 2 + [e["rejected_prompt_ids"] for e in examples]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        chosen = torch.tensor([e["chosen_tokens"] for e in examples])  # (B, N)
        rejected = torch.tensor([e["rejected_tokens"] for e in examples])  # (B, N)
        batch = {
            "prompt_ids": ids,  # (3B, T)
            "prompt_mask": mask,  # (3B, T)
            "image_tokens": torch.cat([chosen, rejected, chosen]),  # (3B, N)
        }
        if "chosen_weights" in examples[0]:
            cw = torch.tensor([e["chosen_weights"] for e in examples])
            rw = torch.tensor([e["rejected_weights"] for e in examples])
            batch["token_weights"] = torch.cat([cw, rw, cw])  # (3B, N); the swapped row shows the chosen image
        return batch
