"""OSPO stage-4 losses as pure tensor functions (spec §4, V3 object weighting §6).

Every preference term follows TRL's contract and returns ``(losses, chosen_rewards, rejected_rewards)``: ``losses``
is per pair ``[B]`` (the caller takes the batch mean) and the rewards are ``beta * logps``, detached, for logging.
Inputs are the length-normalised image-token log-likelihoods ℓ(x, y) = (1/|y|) Σ_t log p(y_t | x, y_<t), shape
``[B]``, produced by the trainer's forward pass. All arithmetic runs in fp32 (bf16 inputs are upcast first) and every
log-sigmoid goes through ``F.logsigmoid``, which stays finite for margins of any size.

``ospo_loss`` writes out the paper's weighted sum once; there is no switch over loss-type strings. Its weights and
scales are an ``OSPOLossConfig`` (ospo_core.config, also the base of TrainConfig), which validates every value, so
the functions here check only tensor shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ospo_core.config import OSPOLossConfig

# Added to the min-max range so an all-zero (or constant) map normalises to 0 instead of 0/0 = NaN (V3 uses 1e-8).
_MINMAX_EPS = 1e-8


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must both be 1-D [B] tensors of per-pair log-likelihoods with the same B; "
            f"got {tuple(a.shape)} and {tuple(b.shape)}. Reduce per-token log-probs with weighted_mean_logps first."
        )


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - ε)·log σ(z) - ε·log σ(-z): the conservative (cDPO) loss, equal to -log σ(z) when ε = 0."""
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (reference-free) loss between the chosen and rejected image under the same base prompt (spec §4, L_S).

    L_S = -log σ(β·(ℓ(x_c, y_w) - ℓ(x_c, y_l) - r)),  with the target margin γ = β·r.
    With label smoothing ε: (1 - ε)·(-log σ(z)) + ε·(-log σ(-z)) for z = β·(ℓ_w - ℓ_l - r).

    Args:
        chosen_logps: [B] length-normalised log-likelihood ℓ(x_c, y_w) of the chosen image.
        rejected_logps: [B] ℓ(x_c, y_l) of the rejected image under the same prompt.
        beta: β, the reward scale (paper v2: β₁ = 3).
        gamma_beta_ratio: r = γ/β, the target margin in log-likelihood units (paper v2: r₁ = 0.5, so γ₁ = 1.5).
        label_smoothing: ε in [0, 0.5), assumed label-flip probability (paper: 0).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are β·ℓ, detached.

    Example:
        ℓ_w = -2.0, ℓ_l = -2.6, β = 3, r = 0.5: z = 3·(0.6 - 0.5) = 0.3, L_S = -log σ(0.3) = 0.5544;
        rewards 3·(-2.0) = -6.0 and 3·(-2.6) = -7.8.
    """
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    logits = beta * (chosen_logps - rejected_logps - gamma_beta_ratio)  # (B,)
    losses = _smoothed_sigmoid_loss(logits, label_smoothing)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def conditional_preference_loss(
    chosen_logps: Tensor,
    swapped_logps: Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Conditional preference (CoPO) loss: the chosen image should fit the base prompt better than the rejected one.

    L_C = -log σ(β·(ℓ(x_c, y_w) - ℓ(x_r, y_w) - r)),  γ = β·r (spec §4, L_C).

    The "swapped" sequence pairs the rejected (perturbed) prompt x_r with the chosen image y_w, so the image is fixed
    and only the conditioning text differs: the model is pushed to read the prompt, not only to like the image.
    Mathematically this is the SimPO form with the swapped sequence in the rejected slot.

    Args:
        chosen_logps: [B] ℓ(x_c, y_w), the chosen image under the base prompt.
        swapped_logps: [B] ℓ(x_r, y_w), the same image under the rejected prompt.
        beta: β (paper v2: β₂ = 5).
        gamma_beta_ratio: r (paper v2: r₂ = 0.5, so γ₂ = 2.5).

    Returns:
        ``(losses [B], chosen_rewards [B], swapped_rewards [B])``; rewards are β·ℓ, detached.

    Example:
        ℓ(x_c, y_w) = -2.0, ℓ(x_r, y_w) = -2.6, β = 5, r = 0.5: z = 5·0.1 = 0.5, L_C = -log σ(0.5) = 0.4741.
    """
    _check_pair("chosen_logps", chosen_logps, "swapped_logps", swapped_logps)
    return simpo_loss(chosen_logps, swapped_logps, beta=beta, gamma_beta_ratio=gamma_beta_ratio)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO with a frozen reference model (an ablation; OSPO itself is reference-free).

    z = β·((π_w - π_l) - (ρ_w - ρ_l)),  L = -log σ(z)  (with smoothing ε: (1 - ε)·(-log σ(z)) + ε·(-log σ(-z))).
    Rewards: β·(π_w - ρ_w) and β·(π_l - ρ_l), detached.

    All four inputs are the same length-normalised MEAN log-likelihoods ℓ that SimPO and CoPO use, not the per-sequence
    sums of the DPO paper. Every image has 576 tokens, so this only rescales β: β here equals β_sum·576.

    Args:
        policy_chosen_logps: [B] π_w = ℓ_policy(x, y_w).
        policy_rejected_logps: [B] π_l = ℓ_policy(x, y_l).
        reference_chosen_logps: [B] ρ_w = ℓ_ref(x, y_w) (no gradient is expected through it).
        reference_rejected_logps: [B] ρ_l = ℓ_ref(x, y_l).
        beta: β, strength of the KL tie to the reference.
        label_smoothing: ε in [0, 0.5), assumed label-flip probability.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.

    Example:
        π_w = -2.0, π_l = -2.6, ρ_w = -2.1, ρ_l = -2.4, β = 0.5: z = 0.5·(0.6 - 0.3) = 0.15,
        L = -log σ(0.15) = 0.6210; rewards 0.5·0.1 = 0.05 and 0.5·(-0.2) = -0.1.
    """
    _check_pair("policy_chosen_logps", policy_chosen_logps, "policy_rejected_logps", policy_rejected_logps)
    _check_pair("reference_chosen_logps", reference_chosen_logps, "reference_rejected_logps", reference_rejected_logps)
    _check_pair("policy_chosen_logps", policy_chosen_logps, "reference_chosen_logps", reference_chosen_logps)
    chosen_logratios = policy_chosen_logps.float() - reference_chosen_logps.float()  # (B,)
    rejected_logratios = policy_rejected_logps.float() - reference_rejected_logps.float()  # (B,)
    losses = _smoothed_sigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _check_tokens(per_token_logps: Tensor, mask: Tensor) -> None:
    if per_token_logps.ndim != 2 or per_token_logps.shape != mask.shape:
        raise ValueError(
            f"per_token_logps and mask must both be [B, T] with the same shape; got {tuple(per_token_logps.shape)} "
            f"and {tuple(mask.shape)}. The mask is 1 on image-token label positions and 0 on text and padding."
        )


def sft_loss(per_token_logps: Tensor, mask: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the chosen images over the whole batch (spec §4, L_SFT).

    L_SFT = -Σ_{b,t} m_{b,t}·log p_{b,t} / Σ_{b,t} m_{b,t}

    Tokens, not sequences, are averaged, as in a plain cross-entropy with ignore_index. Masked positions are never
    read (they may hold -inf), the sum runs in fp32, and an all-zero mask gives 0 rather than 0/0.

    Args:
        per_token_logps: [B, T] log p(y_t | ...) at each label position.
        mask: [B, T] 1 (or True) where the position is a chosen image token, 0 elsewhere.

    Returns:
        Scalar fp32 loss.

    Example:
        logps [[-1, -2, pad], [-3, pad, pad]], mask [[1, 1, 0], [1, 0, 0]]: (1 + 2 + 3) / 3 = 2.0.
    """
    _check_tokens(per_token_logps, mask)
    keep = mask.bool()
    nll_sum = torch.where(keep, -per_token_logps.float(), 0.0).sum()
    return nll_sum / keep.sum().clamp_min(1)


def weighted_mean_logps(per_token_logps: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-sequence (weighted) mean log-likelihood ℓ, or the object-weighted ℓ_w of V3 (spec §4, §6).

    ℓ_w(b) = Σ_t w_{b,t}·m_{b,t}·log p_{b,t} / Σ_t w_{b,t}·m_{b,t}

    With ``weights=None`` (or all ones) this is exactly the plain masked mean ℓ: multiplying by 1.0 is exact in
    floating point, so an all-zero object mask reproduces ℓ bit for bit. A row with no tokens gives 0, not NaN.

    Args:
        per_token_logps: [B, T] log-probs of the label tokens.
        mask: [B, T] 1 on image-token positions, 0 on text and padding.
        weights: optional [B, T] non-negative per-token weights (e.g. ``object_weights`` laid over the image span).

    Returns:
        [B] fp32 mean log-likelihoods.

    Example:
        logps [-1, -2, -3, -4], mask [1, 1, 1, 0], weights [1, 1, 3, 1]:
        (-1 - 2 - 9) / (1 + 1 + 3) = -2.4, while the unweighted mean is -2.0.
    """
    _check_tokens(per_token_logps, mask)
    keep = mask.bool()
    token_weights = keep.float()  # (B, T)
    if weights is not None:
        if weights.shape != mask.shape:
            raise ValueError(
                f"weights must have the mask's shape {tuple(mask.shape)}; got {tuple(weights.shape)}. "
                "Place the [B, H*W] object weights on the image-token positions of a [B, T] tensor of ones."
            )
        token_weights = token_weights * weights.float()
    weighted_sum = torch.where(keep, token_weights * per_token_logps.float(), 0.0).sum(dim=-1)  # (B,)
    total_weight = token_weights.sum(dim=-1)  # (B,)
    # An empty row has weighted_sum 0; dividing it by 1 instead of 0 returns 0 and keeps gradients NaN-free.
    return weighted_sum / torch.where(total_weight > 0, total_weight, 1.0)


def _gaussian_kernel(kernel_size: int, sigma: float) -> Tensor:
    offsets = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2  # (k,)
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (k, k), sums to 1


def object_weights(
    mask_grid: Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    sigma: float = 1.0,
    kernel_size: int = 5,
) -> Tensor:
    """V3 object weights over the image-token grid (spec §6, object-weighted SimPO).

    M' = clamp(minmax(blur(M))^γ, 0, 1),  w = 1 + α·M',  with
    blur = 2-D Gaussian (kernel_size × kernel_size, σ, zero padding kernel_size // 2) and
    minmax(X) = (X - min X) / (max X - min X + 1e-8) per image.

    The blur softens the binary attention mask so tokens next to an object also gain weight; min-max makes the
    weight range independent of object size. An all-zero mask gives M' = 0 / 1e-8 = 0, so w is exactly 1.

    Args:
        mask_grid: [B, H, W] object mask (binary uint8/bool or float), e.g. [B, 24, 24] for 576 Janus tokens.
        alpha: α, extra weight on the object (paper: 1.0; 0 switches weighting off).
        gamma: γ > 0, sharpening exponent (paper: 1.0).
        sigma: Gaussian σ in tokens.
        kernel_size: odd kernel width.

    Returns:
        [B, H·W] fp32 weights in [1, 1 + α], raster order (the order of the image tokens).

    Example:
        A 3×3 mask with only the centre set, σ = 1: the blurred corner, edge and centre are g₁², g₀g₁, g₀² with
        g₁/g₀ = e^(-1/2); min-max maps them to 0, g₁/(g₀ + g₁) = 0.3775 and 1, so with α = 1, γ = 1 the weights are
        1.0, 1.3775 and 2.0.
    """
    if mask_grid.ndim != 3:
        raise ValueError(f"mask_grid must be [B, H, W]; got shape {tuple(mask_grid.shape)}. Add a batch dimension.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number so the blur is centred; got {kernel_size}.")
    if not (sigma > 0 and gamma > 0 and alpha >= 0):
        raise ValueError(
            f"need sigma > 0, gamma > 0 (0^0 = 1 would weight the background) and alpha >= 0; "
            f"got sigma={sigma}, gamma={gamma}, alpha={alpha}."
        )
    grid = mask_grid.float().unsqueeze(1)  # (B, 1, H, W)
    kernel = _gaussian_kernel(kernel_size, sigma).to(grid.device)[None, None]  # (1, 1, k, k)
    blurred = F.conv2d(grid, kernel, padding=kernel_size // 2).flatten(1)  # (B, H*W)
    low = blurred.amin(dim=1, keepdim=True)
    high = blurred.amax(dim=1, keepdim=True)
    normalised = (blurred - low) / (high - low + _MINMAX_EPS)
    return 1.0 + alpha * normalised.pow(gamma).clamp(0.0, 1.0)


def ospo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor | None,
    swapped_logps: Tensor | None,
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    cfg: OSPOLossConfig,
    reference_logps: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The OSPO objective (spec §4): L = mean_batch(w_S·L_S + w_C·L_C) + w_SFT·L_SFT.

    A term whose weight is 0 is not computed, so its input may be None: ``copo_weight=0`` is V3 (no CoPO) and
    ``simpo_weight=copo_weight=0`` is SFT only. Metrics of a skipped term are left out.

    Args:
        chosen_logps: [B] ℓ(x_c, y_w) (object-weighted ℓ_w in V3 mode).
        rejected_logps: [B] ℓ(x_c, y_l), or None when simpo_weight == 0.
        swapped_logps: [B] ℓ(x_r, y_w), or None when copo_weight == 0.
        chosen_token_logps: [B, T] per-token log-probs of the chosen sequence for L_SFT (always unweighted).
        chosen_mask: [B, T] 1 on the chosen image-token positions.
        cfg: weights and scales (a TrainConfig is one).
        reference_logps: ``(ℓ_ref(x_c, y_w), ℓ_ref(x_c, y_l))`` from the frozen reference, required when
            ``cfg.loss == "dpo"``: the pair term is then sigmoid DPO (β = dpo_beta, the same label smoothing)
            instead of SimPO.

    Returns:
        ``(loss, metrics)``: a scalar fp32 loss, and detached fp32 scalars under TRL's names —
        ``rewards/{chosen,rejected,accuracies,margins}`` (SimPO, β₁), ``rewards/{swapped,conditional_margin,
        conditional_accuracies}`` (CoPO, β₂), ``logps/{chosen,rejected,swapped}`` (batch means of ℓ),
        ``nll/chosen`` (the unweighted L_SFT) and ``loss/{preference,conditional,sft}``, the weighted contributions, so
        they add up to ``loss``.

    Example:
        One pair with ℓ_w = -2.0, ℓ_l = -2.6, ℓ(x_r, y_w) = -2.6 and L_SFT = 2.0 under the v2 defaults:
        L = 0.8·0.5544 + 0.5·0.4741 + 1.5·2.0 = 3.6805.
    """
    if chosen_logps.ndim != 1 or chosen_token_logps.shape[:1] != chosen_logps.shape:
        raise ValueError(
            f"chosen_logps must be [B] and chosen_token_logps [B, T] with the same B; got "
            f"{tuple(chosen_logps.shape)} and {tuple(chosen_token_logps.shape)}."
        )
    metrics: dict[str, Tensor] = {"logps/chosen": chosen_logps.detach().float().mean()}
    pair_losses = torch.zeros_like(chosen_logps, dtype=torch.float32)  # (B,)

    if (reference_logps is not None) != (cfg.loss == "dpo"):
        raise ValueError(
            f"loss={cfg.loss!r} but reference_logps is {'None' if reference_logps is None else 'given'}: the dpo pair "
            f"term needs the frozen reference's (ℓ_ref(x_c, y_w), ℓ_ref(x_c, y_l)) and ospo uses none; pass them "
            f"exactly when loss='dpo'."
        )
    if cfg.simpo_weight > 0:
        if rejected_logps is None:
            raise ValueError("rejected_logps is None but simpo_weight > 0; pass ℓ(x_c, y_l) or set simpo_weight=0.")
        if reference_logps is None:
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                chosen_logps,
                rejected_logps,
                beta=cfg.simpo_beta,
                gamma_beta_ratio=cfg.simpo_gamma_ratio,
                label_smoothing=cfg.label_smoothing,
            )
        else:
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen_logps, rejected_logps, *reference_logps, beta=cfg.dpo_beta,
                label_smoothing=cfg.label_smoothing,
            )
        pair_losses = pair_losses + cfg.simpo_weight * losses
        metrics["loss/preference"] = cfg.simpo_weight * losses.detach().mean()
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean()
        metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
        metrics["logps/rejected"] = rejected_logps.detach().float().mean()

    if cfg.copo_weight > 0:
        if swapped_logps is None:
            raise ValueError(
                "swapped_logps is None but copo_weight > 0; pass ℓ(x_r, y_w) (rejected prompt + chosen image) "
                "or set copo_weight=0 to train without CoPO."
            )
        losses, chosen_rewards, swapped_rewards = conditional_preference_loss(
            chosen_logps, swapped_logps, beta=cfg.copo_beta, gamma_beta_ratio=cfg.copo_gamma_ratio
        )
        pair_losses = pair_losses + cfg.copo_weight * losses
        metrics["loss/conditional"] = cfg.copo_weight * losses.detach().mean()
        metrics["rewards/swapped"] = swapped_rewards.mean()
        metrics["rewards/conditional_margin"] = (chosen_rewards - swapped_rewards).mean()
        metrics["rewards/conditional_accuracies"] = (chosen_rewards > swapped_rewards).float().mean()
        metrics["logps/swapped"] = swapped_logps.detach().float().mean()

    nll = sft_loss(chosen_token_logps, chosen_mask)
    metrics["nll/chosen"] = nll.detach()
    metrics["loss/sft"] = cfg.sft_weight * nll.detach()
    loss = pair_losses.mean() + cfg.sft_weight * nll
    return loss, metrics
