"""Batched classifier-free-guidance image sampler with a static KV cache -> sampled token ids + PIL images.

Rows are laid out as transformers' `generate(generation_mode="image")` lays them out: the B conditional rows, then
their B unconditional twins (every prompt token but BOS and <begin_of_image> replaced by pad, same attention mask).
Per step: one LM forward of the 2B new positions, the generation head on the last position only, guidance in fp32
l = l_u + w * (l_c - l_u), then a per-row sample (greedy or inverse-CDF from the row's own seed).

Nothing is allocated per step: the KV cache, the attention mask and the position ids are made once for the whole
sequence (prompt + N image tokens) and each step reads a slice of them; the next token's embedding is written into
one reused buffer. Attention reads only the written part of the cache (`PrefixCache`). The per-token step can be
compiled (`compile_mode=` a `torch.compile` mode; "reduce-overhead" adds CUDA graphs on GPU; "auto" is CUDA graphs
on a GPU and eager on the CPU); eager is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.cache_utils import Cache, StaticLayer

from ospo_core.janus.chat import generation_prompt, unconditional_ids
from ospo_core.janus.load import JanusBundle
from ospo_core.janus.memory import KV_BLOCK, kv_bytes_per_position, resolve_batch, round_up  # KV_BLOCK: ~10
# attention shapes over a 576-token image, so a compiled step is recompiled / re-graphed a handful of times
from ospo_core.janus.sampling import as_seeds, row_uniforms, sample_tokens
from ospo_core.janus.text import positions_from_mask, resolve_compile_mode


@dataclass
class ImageSamples:
    tokens: torch.Tensor  # (B, N) sampled image-token ids, raster order
    images: list[Image.Image]  # B decoded RGB images


class _PrefixLayer(StaticLayer):
    """transformers' `StaticLayer` (preallocated, written in place); attention reads only its first `span` slots."""

    def __init__(self, max_cache_len: int):
        super().__init__(max_cache_len)
        self.span = max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.span, 0

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)  # (2B, H, L, d) each
        return keys[:, :, : self.span], values[:, :, : self.span]  # views, (2B, H, span, d)


class PrefixCache(Cache):
    """A static KV cache whose attention reads only the positions written so far, rounded up to whole KV blocks.

    A plain `StaticCache` attends over its whole length at every step: over a 576-token image that is twice the
    key/value reads of the written positions, and at large batch those reads are most of a step's memory traffic.
    The keys left out are the ones the causal mask hides anyway, so the attention is the same. The sampler says
    how long the sequence will be after each forward (`extend_to`); a Python int, so no step syncs with the GPU,
    and a compiled step sees one attention shape per block, not one per token.
    """

    def __init__(self, config, max_cache_len: int):
        if max_cache_len % KV_BLOCK:
            raise ValueError(f"max_cache_len must be a multiple of KV_BLOCK={KV_BLOCK}, got {max_cache_len}")
        super().__init__(layers=[_PrefixLayer(max_cache_len) for _ in range(config.num_hidden_layers)])
        self.max_cache_len = max_cache_len

    def extend_to(self, length: int) -> None:
        """The next forward fills the cache up to `length` positions: attend over that many, block-rounded."""
        span = -(-length // KV_BLOCK) * KV_BLOCK
        for layer in self.layers:
            layer.span = span


def gen_prompt_batch(bundle: JanusBundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Short text prompts -> left-padded gen-prompt ids and mask, (B, T) each, on the model's device."""
    texts = [generation_prompt(bundle.processor, p) for p in prompts]
    enc = bundle.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"].to(bundle.device), enc["attention_mask"].to(bundle.device)


@torch.no_grad()
def sample_images(bundle: JanusBundle, prompts: list[str], **sampling) -> ImageSamples:
    """Draw one image per prompt: `sample_image_tokens` (same keyword arguments), then the VQ decoder."""
    tokens = sample_image_tokens(bundle, prompts, **sampling)
    return ImageSamples(tokens=tokens, images=decode_images(bundle, tokens))


@torch.no_grad()
def sample_image_tokens(
    bundle: JanusBundle,
    prompts: list[str],
    *,
    cfg_weight: float = 5.0,
    temperature: float = 1.0,
    seed: int | list[int] = 0,
    greedy: bool = False,
    batch_size: int | str = 8,
    compile_mode: str | None = None,
) -> torch.Tensor:
    """One image per prompt as (B, N) image-token ids. `seed` is one integer per prompt (or one for all); each row
    has its own RNG.

    `compile_mode` is a `torch.compile` mode for the per-token step, None or "eager" for none, "auto" for CUDA graphs
    on a GPU and eager on the CPU. `batch_size`: images per batch, or "auto" (by free memory on a GPU, see
    `ospo_core.janus.memory`). Both change the speed, not the distribution (in fp32; bf16 kernels round
    differently); the first batch pays the compilation (about a minute), so it pays off on long GPU runs only.
    """
    if not prompts:
        raise ValueError("sample_images got no prompts")
    if cfg_weight < 0:
        raise ValueError(f"cfg_weight must be >= 0, got {cfg_weight}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
    compile_mode = resolve_compile_mode(compile_mode, bundle.device)
    seeds = as_seeds(seed, len(prompts))
    per_image = 0
    if batch_size == "auto":  # by free memory: 2 cache rows per image (guidance) over prompt + image, fp32 logits
        longest = max(len(bundle.tokenizer(generation_prompt(bundle.processor, p))["input_ids"]) for p in prompts)
        per_image = 2 * (kv_bytes_per_position(bundle.model) * round_up(longest + bundle.num_image_tokens)
                         + 4 * bundle.codebook_size)
    batch_size = resolve_batch(batch_size, "render", bundle.device, per_image, limit=len(prompts))
    # dynamic=None: the attention span (a Python int on the cache) turns symbolic after its first change, so the
    # step compiles a few times, and CUDA graphs ("reduce-overhead") are recorded once per KV block. Not fullgraph:
    # past torch's recompile limit (many batch or prompt lengths) a step falls back to eager instead of failing.
    compiled = compile_mode is not None
    step = torch.compile(guided_logits, mode=compile_mode, dynamic=None) if compiled else guided_logits
    caches: dict[int, PrefixCache] = {}  # one per batch size, reused by every batch: CUDA graphs keep their inputs
    tokens = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        tokens.append(_sample_batch(bundle, batch, seeds[start : start + batch_size], cfg_weight, temperature,
                                    greedy, step, caches))
    return torch.cat(tokens)


def guided_logits(model, embeds, mask, positions, cache, cfg_weight: float) -> torch.Tensor:
    """LM forward of `embeds` (2B, S, D) into `cache` -> guided next-token logits (B, V), fp32, last position only."""
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                        cache=cache, use_cache=True).last_hidden_state[:, -1]  # (2B, D)
    logits = model.model.generation_head(hidden).float()  # (2B, V) fp32
    cond, uncond = logits.chunk(2)  # (B, V) each
    return uncond + cfg_weight * (cond - uncond)  # (B, V)


def sampling_bytes_per_step(model, batch: int, prompt_tokens: int) -> tuple[int, float]:
    """The least a sampling step must read from memory, for `batch` images (2 rows each): (weight bytes, KV bytes).

    Weights: the LM layers, its final norm, the generation head and aligner (embeddings are row lookups). KV: every
    row's keys and values written so far, averaged over the N steps of an image (T + (N - 1) / 2 positions). Their
    sum over a memory bandwidth is a step's time bound; N such steps per batch give the images/s bound.
    """
    janus, cfg = model.model, model.config.text_config
    read = [janus.language_model.layers, janus.language_model.norm, janus.generation_head, janus.generation_aligner]
    weights = sum(p.numel() * p.element_size() for module in read for p in module.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize  # K and V
    n_tokens = model.config.vision_config.num_image_tokens
    return weights, 2 * batch * per_position * (prompt_tokens + (n_tokens - 1) / 2)


def _sample_batch(bundle, prompts, seeds, cfg_weight, temperature, greedy, step, caches) -> torch.Tensor:
    model, tok, device = bundle.model, bundle.tokenizer, bundle.device
    n_tokens, batch = bundle.num_image_tokens, len(prompts)
    cond, prompt_mask = gen_prompt_batch(bundle, prompts)  # (B, T)
    uncond = unconditional_ids(cond, bos_id=tok.bos_token_id, boi_id=bundle.token_id("<begin_of_image>"),
                               pad_id=tok.pad_token_id)
    ids = torch.cat([cond, uncond])  # (2B, T): conditional rows, then their unconditional twins
    t = ids.shape[1]
    # The last image token is never fed back: the sequence is T + N - 1 long, stored in whole KV blocks.
    length = -(-(t + n_tokens - 1) // KV_BLOCK) * KV_BLOCK
    cache = caches.get(2 * batch)
    if cache is None or cache.max_cache_len < length:
        cache = caches[2 * batch] = PrefixCache(model.config.text_config, max_cache_len=length)
    cache.reset()
    length = cache.max_cache_len
    # Mask and positions of the whole sequence, made once. The image slots are ones from the start: the causal
    # mask hides the slots not written yet, so every step passes the same mask (bool, so it is not converted).
    mask = torch.ones(2 * batch, length, dtype=torch.bool, device=device)  # (2B, L)
    mask[:, :t] = torch.cat([prompt_mask, prompt_mask]).bool()
    positions = positions_from_mask(mask)  # (2B, L): left padding does not shift a prompt
    uniforms = None if greedy else row_uniforms(seeds, n_tokens, device)  # (B, N)
    out = torch.empty(batch, n_tokens, dtype=torch.long, device=device)  # (B, N)
    bad = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    embeds = torch.empty(2 * batch, 1, model.config.text_config.hidden_size, dtype=bundle.dtype, device=device)
    cache.extend_to(t)
    guided = guided_logits(model, model.get_input_embeddings()(ids), mask, positions[:, :t], cache, cfg_weight)
    for i in range(n_tokens):
        bad |= ~torch.isfinite(guided).all(-1)  # checked once at the end: no host sync per step
        nxt = sample_tokens(guided, None if greedy else uniforms[:, i], temperature=temperature, greedy=greedy)
        out[:, i] = nxt
        if i + 1 == n_tokens:
            break
        img = model.prepare_embeddings_for_image_generation(nxt.unsqueeze(-1))  # (B, 1, D)
        embeds[:batch] = img  # both twins are fed the token drawn from the guided distribution
        embeds[batch:] = img
        cache.extend_to(t + i + 1)
        guided = step(model, embeds, mask, positions[:, t + i : t + i + 1], cache, cfg_weight)  # (B, V)
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
