"""Batched classifier-free-guidance image sampler with a KV cache -> sampled token ids + PIL images.

Rows are laid out as transformers' `generate(generation_mode="image")` lays them out: the B conditional rows, then
their B unconditional twins (every prompt token but BOS and <begin_of_image> replaced by pad, same attention mask).
Per step: one LM forward of the 2B new positions, the generation head on the last position only, guidance in fp32
l = l_u + w * (l_c - l_u), then a per-row sample (greedy or inverse-CDF from the row's own seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from ospo_core.janus.chat import generation_prompt, unconditional_ids
from ospo_core.janus.load import JanusBundle
from ospo_core.janus.sampling import as_seeds, row_uniforms, sample_tokens
from ospo_core.janus.text import positions_from_mask


@dataclass
class ImageSamples:
    tokens: torch.Tensor  # (B, N) sampled image-token ids, raster order
    images: list[Image.Image]  # B decoded RGB images


def gen_prompt_batch(bundle: JanusBundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Short text prompts -> left-padded gen-prompt ids and mask, (B, T) each, on the model's device."""
    texts = [generation_prompt(bundle.processor, p) for p in prompts]
    enc = bundle.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"].to(bundle.device), enc["attention_mask"].to(bundle.device)


@torch.no_grad()
def sample_images(
    bundle: JanusBundle,
    prompts: list[str],
    *,
    cfg_weight: float = 5.0,
    temperature: float = 1.0,
    seed: int | list[int] = 0,
    greedy: bool = False,
    batch_size: int = 8,
) -> ImageSamples:
    """Draw one image per prompt. `seed` is one integer per prompt (or one for all); each row has its own RNG."""
    if not prompts:
        raise ValueError("sample_images got no prompts")
    if cfg_weight < 0:
        raise ValueError(f"cfg_weight must be >= 0, got {cfg_weight}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
    seeds = as_seeds(seed, len(prompts))
    tokens = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        tokens.append(
            _sample_batch(bundle, batch, seeds[start : start + batch_size], cfg_weight, temperature, greedy)
        )
    tokens = torch.cat(tokens)
    return ImageSamples(tokens=tokens, images=decode_images(bundle, tokens))


def _sample_batch(bundle, prompts, seeds, cfg_weight, temperature, greedy) -> torch.Tensor:
    model, tok = bundle.model, bundle.tokenizer
    lm, head = model.model.language_model, model.model.generation_head
    n_tokens = bundle.num_image_tokens
    cond, mask = gen_prompt_batch(bundle, prompts)  # (B, T)
    uncond = unconditional_ids(cond, bos_id=tok.bos_token_id, boi_id=bundle.token_id("<begin_of_image>"),
                               pad_id=tok.pad_token_id)
    ids = torch.cat([cond, uncond])  # (2B, T): conditional rows, then their unconditional twins
    mask = torch.cat([mask, mask])  # (2B, T)
    positions = positions_from_mask(mask)
    embeds = model.get_input_embeddings()(ids)  # (2B, T, D)
    batch = len(prompts)
    uniforms = None if greedy else row_uniforms(seeds, n_tokens, bundle.device)  # (B, N)
    cache = DynamicCache(config=model.config.text_config)
    out = torch.empty(batch, n_tokens, dtype=torch.long, device=bundle.device)
    bad = torch.zeros(batch, dtype=torch.bool, device=bundle.device)
    for i in range(n_tokens):
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True).last_hidden_state[:, -1]  # (2B, D)
        logits = head(hidden).float()  # (2B, V) fp32, last position only
        cond_l, uncond_l = logits[:batch], logits[batch:]
        guided = uncond_l + cfg_weight * (cond_l - uncond_l)  # (B, V)
        bad |= ~torch.isfinite(guided).all(-1)  # checked once at the end: no host sync per step
        nxt = sample_tokens(guided, None if greedy else uniforms[:, i], temperature=temperature, greedy=greedy)
        out[:, i] = nxt
        embeds = model.prepare_embeddings_for_image_generation(torch.cat([nxt, nxt]).unsqueeze(-1))  # (2B, 1, D)
        mask = torch.cat([mask, mask.new_ones(2 * batch, 1)], dim=-1)
        positions = positions[:, -1:] + 1
    if bool(bad.any()):
        which = [p for p, b in zip(prompts, bad.tolist()) if b]
        raise FloatingPointError(
            f"non-finite image logits for prompt(s) {which!r}: the model weights are broken (NaN/inf); "
            "check the checkpoint or the last adapter merged into it"
        )
    return out


@torch.no_grad()
def decode_images(bundle: JanusBundle, tokens: torch.Tensor) -> list[Image.Image]:
    """VQ-decode (B, N) token ids -> RGB PIL images; decoder values in [-1, 1] map to uint8 as clip((x+1)/2*255).

    One image per decoder call: batched convolutions round differently with the batch size, and an image must not
    depend on what it was decoded with (tables are compared row for row across shardings). Decoding is a small
    fraction of the cost of sampling.
    """
    images = []
    for row in tokens.to(bundle.device):
        pixels = bundle.model.decode_image_tokens(row.unsqueeze(0))[0]  # (H, W, 3)
        arr = ((pixels.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).cpu().numpy()
        images.append(Image.fromarray(np.ascontiguousarray(arr)))
    return images
