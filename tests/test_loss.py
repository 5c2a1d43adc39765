"""Unit tests for ospo_core.train.loss: hand-picked log-likelihoods with the maths worked out in each docstring.

softplus(z) = log(1 + e^z), so -log σ(z) = softplus(-z).
"""

import math

import pytest
import torch
from torch.testing import assert_close

from ospo_core.config import TrainConfig
from ospo_core.train.loss import (
    OSPOLossConfig,
    conditional_preference_loss,
    dpo_loss,
    object_weights,
    ospo_loss,
    sft_loss,
    simpo_loss,
    weighted_mean_logps,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


class TestPreferenceTerms:
    def test_simpo_hand_value(self):
        """Spec §8.12: ℓ_w = -2.0, ℓ_l = -2.6, β = 3, r = 0.5.

        z = 3·(-2.0 + 2.6 - 0.5) = 3·0.1 = 0.3;  L_S = log(1 + e^-0.3) = 0.5544.
        Rewards: 3·(-2.0) = -6.0, 3·(-2.6) = -7.8.
        """
        losses, chosen_rewards, rejected_rewards = simpo_loss(_t(-2.0), _t(-2.6), beta=3.0, gamma_beta_ratio=0.5)
        assert round(losses.item(), 4) == 0.5544
        assert_close(chosen_rewards, _t(-6.0))
        assert_close(rejected_rewards, _t(-7.8))

    def test_conditional_preference_hand_value(self):
        """ℓ(x_c, y_w) = -2.0, ℓ(x_r, y_w) = -2.6, β = 5, r = 0.5: z = 5·0.1 = 0.5; L_C = log(1 + e^-0.5) = 0.4741."""
        losses, chosen_rewards, swapped_rewards = conditional_preference_loss(
            _t(-2.0), _t(-2.6), beta=5.0, gamma_beta_ratio=0.5
        )
        assert round(losses.item(), 4) == 0.4741
        assert_close(chosen_rewards, _t(-10.0))
        assert_close(swapped_rewards, _t(-13.0))

    def test_simpo_label_smoothing_hand_value(self):
        """ε = 0.1, z = 0.3: 0.9·softplus(-0.3) + 0.1·softplus(0.3) = 0.9·0.55436 + 0.1·0.85436 = 0.58436."""
        losses, _, _ = simpo_loss(_t(-2.0), _t(-2.6), beta=3.0, gamma_beta_ratio=0.5, label_smoothing=0.1)
        assert_close(losses, _t(0.5843552))

    def test_dpo_hand_value(self):
        """π_w = -2.0, π_l = -2.6, ρ_w = -2.1, ρ_l = -2.4, β = 0.5.

        z = 0.5·((-2.0 + 2.6) - (-2.1 + 2.4)) = 0.5·(0.6 - 0.3) = 0.15;  L = log(1 + e^-0.15) = 0.620957.
        Rewards: 0.5·(-2.0 + 2.1) = 0.05 and 0.5·(-2.6 + 2.4) = -0.1.
        """
        losses, chosen_rewards, rejected_rewards = dpo_loss(_t(-2.0), _t(-2.6), _t(-2.1), _t(-2.4), beta=0.5)
        assert_close(losses, _t(0.6209570))
        assert_close(chosen_rewards, _t(0.05))
        assert_close(rejected_rewards, _t(-0.1))

    def test_rewards_are_detached(self):
        chosen = _t(-2.0).requires_grad_()
        _, chosen_rewards, _ = simpo_loss(chosen, _t(-2.6), beta=3.0, gamma_beta_ratio=0.5)
        assert not chosen_rewards.requires_grad

    def test_shape_mismatch_names_the_inputs(self):
        with pytest.raises(ValueError, match="chosen_logps and rejected_logps"):
            simpo_loss(_t(-2.0, -1.0), _t(-2.6), beta=3.0, gamma_beta_ratio=0.5)



class TestSFT:
    def test_token_mean_hand_value(self):
        """logps [[-1, -2, pad], [-3, pad, pad]], mask [[1, 1, 0], [1, 0, 0]].

        Token mean over the batch (not the mean of row means): (1 + 2 + 3) / 3 = 2.0. Padding holds -inf here, so a
        masked position that leaked into the sum would make the loss infinite.
        """
        logps = torch.tensor([[-1.0, -2.0, -math.inf], [-3.0, -math.inf, -math.inf]])
        mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        assert_close(sft_loss(logps, mask), torch.tensor(2.0))

    def test_empty_mask_gives_zero_without_nan(self):
        logps = torch.full((2, 3), -1.5, requires_grad=True)
        loss = sft_loss(logps, torch.zeros(2, 3, dtype=torch.long))
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(logps.grad).all()

    def test_bf16_input_accumulates_in_fp32(self):
        logps = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
        assert sft_loss(logps, torch.ones(1, 2)).dtype == torch.float32


class TestWeightedMean:
    def test_hand_weights(self):
        """logps [-1, -2, -3, -4], mask [1, 1, 1, 0], w [1, 1, 3, 1]: (-1 - 2 - 9) / 5 = -2.4; plain -6/3 = -2.0."""
        logps = _t(-1.0, -2.0, -3.0, -4.0)[None]
        mask = torch.tensor([[1, 1, 1, 0]])
        assert_close(weighted_mean_logps(logps, mask, _t(1.0, 1.0, 3.0, 1.0)[None]), _t(-2.4))
        assert_close(weighted_mean_logps(logps, mask), _t(-2.0))

    def test_empty_row_gives_zero_without_nan(self):
        logps = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]], requires_grad=True)
        means = weighted_mean_logps(logps, torch.tensor([[1, 1], [0, 0]]))
        means.sum().backward()
        assert_close(means.detach(), _t(-2.0, 0.0))
        assert torch.isfinite(logps.grad).all()

    def test_all_zero_object_mask_reproduces_plain_mean_exactly(self):
        """Spec §8.12: M = 0 -> M' = 0 / (0 + 1e-8) = 0 -> w = 1, so ℓ_w must equal ℓ bit for bit."""
        generator = torch.Generator().manual_seed(0)
        logps = -torch.rand(2, 16, generator=generator) * 5
        mask = torch.ones(2, 16)
        weights = object_weights(torch.zeros(2, 4, 4), alpha=1.0, gamma=1.0)
        assert torch.equal(weights, torch.ones(2, 16))
        assert torch.equal(weighted_mean_logps(logps, mask, weights), weighted_mean_logps(logps, mask))

    def test_object_mask_raises_the_weight_of_masked_tokens(self):
        """A 1×3 grid with the middle token masked, σ = 1, α = 1.

        Blur (zero padding) keeps only the kernel's centre row: sides g₀g₁, middle g₀², with g₀ > g₁. Min-max maps
        the sides to 0 and the middle to 1 (up to the 1e-8 in the denominator), so w = [1, 2, 1].
        logps [-1, -4, -1]: ℓ_w = (-1 - 8 - 1) / 4 = -2.5, pulled towards the object token; plain ℓ = -2.0.
        """
        weights = object_weights(torch.tensor([[[0, 1, 0]]], dtype=torch.uint8), alpha=1.0)
        assert_close(weights, _t(1.0, 2.0, 1.0)[None])
        logps = _t(-1.0, -4.0, -1.0)[None]
        assert_close(weighted_mean_logps(logps, torch.ones(1, 3), weights), _t(-2.5))

    def test_blur_minmax_gamma_on_3x3(self):
        """3×3 mask with only the centre set, 5×5 Gaussian, σ = 1, zero padding 2, α = 0.5, γ = 2.

        1-D taps g_d = e^(-d²/2) / Z for d = -2..2, Z = 1 + 2e^(-1/2) + 2e^(-2); g₀ = 1/Z, g₁ = e^(-1/2)/Z.
        With zero padding only the impulse contributes: centre g₀², edges g₀g₁, corners g₁² (reflect padding would
        add mirrored impulses and change these).
        Min-max: M' = (v - g₁²) / (g₀² - g₁² + 1e-8) -> corners 0, centre ≈ 1, edges ≈ g₁/(g₀ + g₁) = 0.3775.
        γ = 2 squares them; w = 1 + 0.5·M'^2 -> corners 1, edges 1 + 0.5·0.1425, centre ≈ 1.5.
        """
        z = 1 + 2 * math.exp(-0.5) + 2 * math.exp(-2)
        g0, g1 = 1 / z, math.exp(-0.5) / z
        span = g0 * g0 - g1 * g1 + 1e-8
        corner, edge, centre = (1 + 0.5 * ((v - g1 * g1) / span) ** 2 for v in (g1 * g1, g0 * g1, g0 * g0))
        expected = torch.tensor([[corner, edge, corner, edge, centre, edge, corner, edge, corner]])
        mask = torch.zeros(1, 3, 3)
        mask[0, 1, 1] = 1.0
        assert_close(object_weights(mask, alpha=0.5, gamma=2.0), expected)
        assert round(edge, 4) == round(1 + 0.5 * 0.37754**2, 4)

    def test_weights_are_per_image(self):
        """Min-max runs per image: an empty mask beside a non-empty one still gets weights of exactly 1."""
        masks = torch.zeros(2, 3, 3)
        masks[1, 0, 0] = 1.0
        weights = object_weights(masks)
        assert torch.equal(weights[0], torch.ones(9))
        assert weights[1, 0] > weights[1, 8]

    def test_bad_object_weight_settings_are_refused(self):
        with pytest.raises(ValueError, match="gamma > 0"):
            object_weights(torch.zeros(1, 3, 3), gamma=0.0)
        with pytest.raises(ValueError, match="odd"):
            object_weights(torch.zeros(1, 3, 3), kernel_size=4)


# Two pairs, worked out once for the ospo_loss tests below (v2 defaults: β₁ = 3, r₁ = 0.5, β₂ = 5, r₂ = 0.5).
#   chosen ℓ_w   = [-2.0, -3.0]
#   rejected ℓ_l = [-2.6, -2.5]   SimPO z = 3·([0.6, -0.5] - 0.5) = [0.3, -3.0]
#                                  L_S = [0.554355, 3.048587], mean 1.801471
#   swapped      = [-2.6, -3.2]   CoPO z = 5·([0.6, 0.2] - 0.5) = [0.5, -1.5]
#                                  L_C = [0.474077, 1.701413], mean 1.087745
#   chosen tokens [[-1, -3], [-2, pad]] -> L_SFT = (1 + 3 + 2) / 3 = 2.0
CHOSEN, REJECTED, SWAPPED = _t(-2.0, -3.0), _t(-2.6, -2.5), _t(-2.6, -3.2)
TOKENS = torch.tensor([[-1.0, -3.0], [-2.0, -7.0]])
TOKEN_MASK = torch.tensor([[1, 1], [1, 0]])
MEAN_SIMPO, MEAN_COPO, SFT = 1.8014713, 1.0877451, 2.0


class TestOSPOLoss:
    def test_weighted_sum_hand_value(self):
        """L = 0.8·1.801471 + 0.5·1.087745 + 1.5·2.0 = 1.441177 + 0.543873 + 3.0 = 4.985050."""
        loss, metrics = ospo_loss(CHOSEN, REJECTED, SWAPPED, TOKENS, TOKEN_MASK, OSPOLossConfig())
        assert_close(loss, torch.tensor(4.9850496))
        assert_close(metrics["loss/preference"], torch.tensor(0.8 * MEAN_SIMPO))
        assert_close(metrics["loss/conditional"], torch.tensor(0.5 * MEAN_COPO))
        assert_close(metrics["loss/sft"], torch.tensor(1.5 * SFT))
        assert_close(metrics["nll/chosen"], torch.tensor(SFT))
        assert_close(metrics["loss/preference"] + metrics["loss/conditional"] + metrics["loss/sft"], loss.detach())

    def test_metrics(self):
        """SimPO rewards (β₁ = 3): chosen [-6, -9] mean -7.5; rejected [-7.8, -7.5] mean -7.65;
        margins [1.8, -1.5] mean 0.15; accuracies [1, 0] -> 0.5.
        CoPO rewards (β₂ = 5): chosen [-10, -15]; swapped [-13, -16] mean -14.5; conditional margin [3, 1] mean 2.0;
        conditional accuracies 1.0. logps are the plain batch means.
        """
        _, metrics = ospo_loss(CHOSEN, REJECTED, SWAPPED, TOKENS, TOKEN_MASK, OSPOLossConfig())
        expected = {
            "rewards/chosen": -7.5,
            "rewards/rejected": -7.65,
            "rewards/margins": 0.15,
            "rewards/accuracies": 0.5,
            "rewards/swapped": -14.5,
            "rewards/conditional_margin": 2.0,
            "rewards/conditional_accuracies": 1.0,
            "logps/chosen": -2.5,
            "logps/rejected": -2.55,
            "logps/swapped": -2.9,
            "nll/chosen": 2.0,
        }
        for key, value in expected.items():
            assert_close(metrics[key], torch.tensor(value), msg=key)
        assert set(metrics) == set(expected) | {"loss/preference", "loss/conditional", "loss/sft"}
        assert all(m.ndim == 0 and m.dtype == torch.float32 and not m.requires_grad for m in metrics.values())

    def test_no_copo_ignores_swapped(self):
        """copo_weight = 0 (V3): L = 0.8·1.801471 + 1.5·2.0 = 4.441177, whatever swapped holds (None accepted)."""
        cfg = OSPOLossConfig(copo_weight=0.0)
        loss, metrics = ospo_loss(CHOSEN, REJECTED, None, TOKENS, TOKEN_MASK, cfg)
        assert_close(loss, torch.tensor(0.8 * MEAN_SIMPO + 1.5 * SFT))
        other, _ = ospo_loss(CHOSEN, REJECTED, _t(0.0, 0.0), TOKENS, TOKEN_MASK, cfg)
        assert torch.equal(loss, other)
        assert not any(key in metrics for key in ("loss/conditional", "rewards/swapped", "rewards/conditional_margin"))

    def test_sft_only(self):
        """simpo_weight = copo_weight = 0: L = 1.5·2.0 = 3.0 with no rejected or swapped inputs."""
        cfg = OSPOLossConfig(simpo_weight=0.0, copo_weight=0.0)
        loss, metrics = ospo_loss(CHOSEN, None, None, TOKENS, TOKEN_MASK, cfg)
        assert_close(loss, torch.tensor(3.0))
        assert "rewards/margins" not in metrics

    def test_missing_swapped_with_copo_on_is_refused(self):
        with pytest.raises(ValueError, match="copo_weight"):
            ospo_loss(CHOSEN, REJECTED, None, TOKENS, TOKEN_MASK, OSPOLossConfig())

    def test_config_refuses_negative_weight(self):
        with pytest.raises(ValueError, match="sft_weight"):
            OSPOLossConfig(sft_weight=-1.0)

    def test_config_refuses_label_smoothing_out_of_range(self):
        """ε is a flip probability below 1/2 (at 1/2 the pair term no longer prefers anything)."""
        with pytest.raises(ValueError, match="label_smoothing"):
            OSPOLossConfig(label_smoothing=0.6)

    def test_train_config_is_the_loss_config(self):
        """The round's train settings reach the loss unchanged: TrainConfig(copo_weight=0) gives the V3 value
        0.8·1.801471 + 1.5·2.0 of test_no_copo_ignores_swapped."""
        loss, _ = ospo_loss(CHOSEN, REJECTED, None, TOKENS, TOKEN_MASK, TrainConfig(copo_weight=0.0))
        assert_close(loss, torch.tensor(0.8 * MEAN_SIMPO + 1.5 * SFT))

    def test_dpo_pair_term_hand_value(self):
        """loss = "dpo", dpo_beta = 0.5, only the pair term: the dpo_loss example, π_w = -2.0, π_l = -2.6, ρ_w = -2.1,
        ρ_l = -2.4: z = 0.5·(0.6 - 0.3) = 0.15, L = log(1 + e^-0.15) = 0.620957."""
        cfg = OSPOLossConfig(loss="dpo", dpo_beta=0.5, simpo_weight=1.0, copo_weight=0.0, sft_weight=0.0)
        loss, _ = ospo_loss(_t(-2.0), _t(-2.6), None, TOKENS[:1], TOKEN_MASK[:1], cfg,
                            reference_logps=(_t(-2.1), _t(-2.4)))
        assert_close(loss, torch.tensor(0.620957))

    def test_reference_logps_must_match_the_loss(self):
        dpo = OSPOLossConfig(loss="dpo")
        with pytest.raises(ValueError, match="loss='dpo' but reference_logps is None"):
            ospo_loss(CHOSEN, REJECTED, SWAPPED, TOKENS, TOKEN_MASK, dpo)
        with pytest.raises(ValueError, match="loss='ospo' but reference_logps is given"):
            ospo_loss(CHOSEN, REJECTED, SWAPPED, TOKENS, TOKEN_MASK, OSPOLossConfig(),
                      reference_logps=(CHOSEN, REJECTED))


class TestGradients:
    def test_backward_is_finite_and_points_the_right_way(self):
        """dL/dℓ_w < 0 (raise the chosen likelihood), dL/dℓ_l > 0 and dL/dℓ(x_r, y_w) > 0 (lower the others)."""
        chosen, rejected, swapped = (x.clone().requires_grad_() for x in (CHOSEN, REJECTED, SWAPPED))
        tokens = TOKENS.clone().requires_grad_()
        loss, _ = ospo_loss(chosen, rejected, swapped, tokens, TOKEN_MASK, OSPOLossConfig())
        loss.backward()
        for grad in (chosen.grad, rejected.grad, swapped.grad, tokens.grad):
            assert torch.isfinite(grad).all()
        assert (chosen.grad < 0).all() and (rejected.grad > 0).all() and (swapped.grad > 0).all()
        # L_SFT = -(sum of the 3 masked logps)/3 with weight 1.5: each masked token gets -0.5, the padded one 0.
        assert_close(tokens.grad, torch.tensor([[-0.5, -0.5], [-0.5, 0.0]]))

    @pytest.mark.parametrize(("chosen", "rejected"), [(-1e4, 0.0), (0.0, -1e4)])
    def test_extreme_logps_stay_finite(self, chosen, rejected):
        """SimPO z = 3·(ℓ_w - ℓ_l - 0.5) ≈ ±3e4: σ(z) underflows to 0 in fp32, but logsigmoid gives ≈ -3e4 or 0,
        never -inf."""
        chosen_t = _t(chosen).requires_grad_()
        rejected_t = _t(rejected).requires_grad_()
        loss, _ = ospo_loss(chosen_t, rejected_t, rejected_t, TOKENS[:1], TOKEN_MASK[:1], OSPOLossConfig())
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(chosen_t.grad).all() and torch.isfinite(rejected_t.grad).all()
