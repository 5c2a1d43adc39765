"""How long a round takes: per-stage wall time from the round's config, a model size and a device profile.

Each stage's time is its fixed cost (model in the process, compilation, writing tables) plus its work over the
throughput the benchmarks measured on that device for that model size, and never less than the physical bound of
that work: decode steps read the weights and the rows' keys/values once per token at the device's memory
bandwidth; prefill, scoring and training do their FLOPs at the device's peak. The work comes from the config:

    items      = sum of the prompt quotas                      (16,002 in the paper)
    draws      = items / acceptance (a random model: every draw, ceil(quota x max_draws_per_item))
    negatives  = items x perturbations of their sub-category   (3 each: ~48k)
    dense      = negatives                                     (one chat writes both dense prompts)
    questions  = items + negatives                             (the base prompt and every negative)
    images     = 2 x dense                                     (~96k)
    vqa pairs  = images x questions per image
    train      = max_steps x pairs per step x 3 rows x (prompt + image tokens)

Device profiles are JSON files in `ospo_core/data/profiles/` (`python -m bench.round --write-profile` writes the
CPU one from a measured round; `bench/RESULTS.md` says where each figure of the H200 one comes from).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ospo_core.config import RoundConfig
from ospo_core.templates import SUB_CATEGORIES, perturbations_for

PROFILES = Path(__file__).parent / "data" / "profiles"
STAGES = ("prompts", "perturb", "densify", "render", "questions", "vqa", "select", "train")
TEXT_STAGES = ("prompts", "perturb", "densify", "questions")

# Model shapes (Janus-Pro's published ones; tiny and mid are the built-in and benchmark models): LM parameters
# (what a token's forward multiplies), LM layers, KV heads x head dim, and the image-prompt tokens seen by VQA.
SIZES = {
    "tiny": dict(lm_params=0.3e6, layers=2, kv_width=64, image_tokens=16),
    "mid": dict(lm_params=41e6, layers=8, kv_width=512, image_tokens=576),
    "1b": dict(lm_params=1.65e9, layers=24, kv_width=2048, image_tokens=576),
    "7b": dict(lm_params=6.9e9, layers=30, kv_width=4096, image_tokens=576),
}
# Tokens a checkpoint typically writes per answer (the templates' own shots; stages stop at EOS, and continuous
# batching makes a batch pay for the answers it writes, not for its longest). Random-weight models never write EOS:
# they run to max_new_tokens.
ANSWER_TOKENS = {"prompts": 40, "perturb": 30, "densify": 120, "questions": 60}
SUFFIX_TOKENS = {"prompts": 0, "perturb": 25, "densify": 40, "questions": 15}  # each chat's own tokens after the prefix
PREFIX_TOKENS = 800  # the few-shot prefix a row's cache holds (system + shots)
ACCEPTANCE = 0.7  # share of a checkpoint's stage-1 draws that parse and are new
QUESTIONS_PER_IMAGE = 5
PROMPT_TOKENS = 40  # gen-prompt tokens of a training row
DATA_PARALLEL_EFFICIENCY = 0.9


@dataclass
class StageEstimate:
    stage: str
    work: float
    unit: str
    seconds: float
    bound_seconds: float
    basis: str  # where the throughput comes from (measured / derived)


def load_profile(device: str) -> dict:
    path = PROFILES / f"{device}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.json"))
        raise ValueError(f"no device profile {device!r}; known: {known} (python -m bench.round --write-profile "
                         f"writes one for this machine)")
    return json.loads(path.read_text())


def work(cfg: RoundConfig, size: str) -> dict[str, tuple[float, str]]:
    """Each stage's work and its unit, from the config (see the module docstring)."""
    random_weights = size in ("tiny", "mid")
    items = draws = negatives = 0
    for key in SUB_CATEGORIES:
        quota = cfg.prompts.quota_for(key)
        if not quota:
            continue
        items += quota
        most = math.ceil(quota * cfg.prompts.max_draws_per_item)
        draws += most if random_weights else min(most, math.ceil(quota / ACCEPTANCE))
        negatives += quota * len(perturbations_for(SUB_CATEGORIES[key][1]))
    chats = {"prompts": draws, "perturb": negatives, "densify": negatives, "questions": items + negatives}
    from ospo_core.plugins import WORLDS, WRITERS

    decodes = WRITERS[WORLDS[cfg.world][0]].writes_with_model  # the shapes world writes without the model
    out = {}
    for stage in TEXT_STAGES:
        budget = getattr(cfg, stage).max_new_tokens
        per_answer = budget if random_weights else min(budget, ANSWER_TOKENS[stage])
        out[stage] = ((chats[stage] * per_answer, f"tokens ({chats[stage]} chats)") if decodes
                      else (0, "tokens (0 chats: world)"))
    images = 2 * negatives
    out["render"] = (images, "images")
    out["vqa"] = (images * QUESTIONS_PER_IMAGE, "image-question pairs")
    out["select"] = (items, "items")
    tokens = SIZES[size]["image_tokens"] + PROMPT_TOKENS
    pairs = cfg.train.max_steps * cfg.train.batch_size * cfg.train.accumulation()
    out["train"] = (pairs * 3 * tokens, f"tokens ({cfg.train.max_steps} steps)")
    return {stage: out[stage] for stage in STAGES}


def bound_seconds(stage: str, amount: float, size: str, device: dict, chats: float = 0.0,
                  batch: int | None = None) -> float:
    """The least time the stage's work can take on the device (memory traffic or FLOPs at their peaks)."""
    shape = SIZES[size]
    bandwidth, flops = device["bandwidth_GBps"] * 1e9, device["peak_tflops"] * 1e12
    dtype_bytes = device["dtype_bytes"]
    weights = shape["lm_params"] * dtype_bytes
    kv = 2 * shape["layers"] * shape["kv_width"] * dtype_bytes  # bytes per cached position
    batch = batch or device["decode_batch"]
    if stage in TEXT_STAGES:  # decode steps read the weights and every row's cache; prefill is compute
        steps = amount / batch
        step_bytes = weights + batch * kv * (PREFIX_TOKENS + SUFFIX_TOKENS[stage] + ANSWER_TOKENS[stage] / 2)
        return steps * step_bytes / bandwidth + 2 * shape["lm_params"] * chats * SUFFIX_TOKENS[stage] / flops
    if stage == "render":  # 576 steps per batch of images, 2 rows each (guidance)
        n = shape["image_tokens"]
        step_bytes = weights + 2 * batch * kv * (PROMPT_TOKENS + n / 2)
        return amount / batch * n * step_bytes / bandwidth
    if stage == "vqa":
        tokens = amount / QUESTIONS_PER_IMAGE * (shape["image_tokens"] + 60) + amount * 20
        return 2 * shape["lm_params"] * tokens / flops
    if stage == "train":  # forward + activation gradients through frozen weights (LoRA's own are small)
        return 4 * shape["lm_params"] * amount / flops
    return 0.0


def estimate(cfg: RoundConfig, *, size: str, device: str, gpus: int = 1) -> list[StageEstimate]:
    """Per-stage estimates (stage order of a round) for `cfg` on `gpus` devices of profile `device`."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; pick one of {sorted(SIZES)}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    profile = load_profile(device)
    rates = profile["sizes"].get(size)
    if rates is None:
        raise ValueError(f"the {device} profile has no figures for model size {size!r}; it has "
                         f"{sorted(profile['sizes'])}")
    out = []
    for stage, (amount, unit) in work(cfg, size).items():
        rate, fraction = rates["rates"].get(stage), rates.get("bound_fraction", {}).get(stage)
        chats = float(unit.split("(")[1].split()[0]) if stage in TEXT_STAGES else 0.0
        bound = bound_seconds(stage, amount, size, profile, chats, rates.get("decode_batch"))
        # measured throughput, else a measured fraction of the bound (a stage not yet run on this device)
        measured = amount / rate if rate else bound / fraction if fraction else 0.0
        # Rendering, scoring and text shard over devices (Ray); training is data-parallel.
        share = gpus * DATA_PARALLEL_EFFICIENCY if stage == "train" else gpus
        seconds = rates["overhead_s"].get(stage, 0.0) + max(measured, bound) / min(share, max(amount, 1))
        out.append(StageEstimate(stage, amount, unit, seconds, bound / share, rates["basis"].get(stage, "")))
    return out


def table(estimates: list[StageEstimate]) -> str:
    """The per-stage table, ending with `total: <hours> h`."""
    total = sum(e.seconds for e in estimates)
    lines = [f"{'stage':<10} {'work':>14} {'unit':<28} {'seconds':>10} {'share':>6} {'bound s':>9}  basis"]
    for e in estimates:
        lines.append(f"{e.stage:<10} {e.work:>14,.0f} {e.unit:<28} {e.seconds:>10,.0f} {e.seconds / total:>6.1%} "
                     f"{e.bound_seconds:>9,.0f}  {e.basis}")
    lines.append(f"total: {total / 3600:.2f} h")
    return "\n".join(lines)


def model_size(model: str) -> str:
    """The SIZES entry nearest to a round's model: 'tiny', or a checkpoint folder's LM width and depth."""
    if model == "tiny":
        return "tiny"
    config = Path(model) / "config.json"
    try:
        text = json.loads(config.read_text()).get("text_config", {})
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"cannot read {config} to size the model; pass --model-size") from None
    width, layers = text.get("hidden_size", 0), text.get("num_hidden_layers", 0)
    return min(SIZES, key=lambda s: abs(SIZES[s]["kv_width"] - width) + 64 * abs(SIZES[s]["layers"] - layers))


def this_device() -> str:
    """The profile name of this machine's accelerator: 'h200' on an H200, else the CUDA card's or 'cpu'."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return next((p.stem for p in PROFILES.glob("*.json") if p.stem in name), name.split()[-1])


def round_estimate(cfg: RoundConfig, *, size: str | None = None, device: str | None = None, gpus: int = 1) -> str:
    """The table for a round about to run (its model's size, this machine's device), or one line saying why
    there is none."""
    try:
        size, device = size or model_size(cfg.model), device or this_device()
        return f"estimate ({size} on {gpus} x {device}):\n" + table(estimate(cfg, size=size, device=device, gpus=gpus))
    except ValueError as error:
        return f"no estimate: {error}"
