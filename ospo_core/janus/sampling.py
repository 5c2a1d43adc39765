"""Per-row reproducible token sampling, shared by the text and image samplers.

Each row owns a generator seeded by its own seed and draws all its uniforms up front; a token is then drawn by
inverse-CDF over the (temperature, top-p) distribution. So a prompt's sample depends only on its seed and its own
logits, never on what else is in the batch or on how a table is sharded, and the sampling step itself is a few
vectorised ops with no per-row Python loop.
"""

from __future__ import annotations

import torch


def as_seeds(seed: int | list[int], n: int) -> list[int]:
    """One integer per prompt; a single integer is expanded to every prompt."""
    if isinstance(seed, int):
        return [seed] * n
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts; pass one seed per prompt or a single integer")
    return seeds


def row_uniforms(seeds: list[int], steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, steps) uniforms in [0, 1), row b drawn from a CPU generator seeded with seeds[b] (device-independent)."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device)


def sample_tokens(
    logits: torch.Tensor,  # (B, V), any float dtype
    uniforms: torch.Tensor | None,  # (B,) in [0, 1), ignored when greedy
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> torch.Tensor:
    """Next token per row: argmax when greedy, else inverse-CDF sampling from softmax(logits / T) cut at top_p."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V) fp32
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    else:
        sorted_probs, order = probs, None
    cdf = sorted_probs.double().cumsum(-1)  # (B, V); fp64 so the last bin reaches the total mass
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
    tokens = idx if order is None else order.gather(-1, idx)
    return tokens.squeeze(-1)
