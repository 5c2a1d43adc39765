"""One OSPO training step: one concatenated forward over the 3B rows vs three separate forwards over the same rows.

A step is what `OSPOTrainer.compute_loss` does: image-token log-probs of (x_c, y_w), (x_c, y_l), (x_r, y_w) under
the generation head (logits at image positions only), the OSPO loss, backward into the LoRA weights of the LM.
The baseline computes the same rows in three forwards (one per sequence kind), as a trainer without the 3B-row
collator would. Throughput counts every sequence token (prompt + 576 image tokens) of the 3B rows.
Peak memory is the step's growth of resident memory (CPU) or of allocated CUDA memory.

    python -m bench.training [--size mid] [--pairs 1] [--repeats 2] [--gradient-checkpointing]
"""

from __future__ import annotations


import torch
from peft import LoraConfig, get_peft_model

from bench.harness import emit, parse_args, ratios, side_by_side, summary
from bench.models import build_janus_for_bench, parameter_count
from bench.sampler import COLORS, OBJECTS
from ospo_core.janus.load import LORA_TARGET_REGEX
from ospo_core.janus.score import image_token_logps
from ospo_core.train.data import OSPOCollator, tokenize_prompts
from ospo_core.train.loss import OSPOLossConfig, ospo_loss, weighted_mean_logps

VARIANTS = ("three_separate_forwards", "one_concatenated_forward")
UNCHUNKED = "one_concatenated_forward_unchunked_head"  # the head's log-softmax over all positions at once


def lora_policy(bundle, gradient_checkpointing: bool = False):
    """Wrap the bundle's model (in place) with the trainer's LoRA: r=32, alpha=64, LM projections only."""
    policy = get_peft_model(bundle.model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0,
                                                     target_modules=LORA_TARGET_REGEX))
    if gradient_checkpointing:
        policy.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input that wants grads
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    return policy


def pair_batch(bundle, pairs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The collator's (3B, T) prompts and (3B, N) image tokens for `pairs` random pairs, on the model's device."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(bundle.codebook_size, (pairs, 2, bundle.num_image_tokens), generator=gen)  # (B, 2, N)
    examples = []
    for b in range(pairs):
        prompt = f"a {COLORS[b % len(COLORS)]} {OBJECTS[b % len(OBJECTS)]} next to a {OBJECTS[(b + 3) % len(OBJECTS)]}"
        rejected = f"a {COLORS[(b + 1) % len(COLORS)]} {OBJECTS[b % len(OBJECTS)]}"
        example = {"prompt": prompt, "rejected_prompt": rejected, "chosen_tokens": tokens[b, 0].tolist(),
                   "rejected_tokens": tokens[b, 1].tolist()}
        examples.append({**example, **tokenize_prompts(example, bundle.processor)})
    batch = OSPOCollator(pad_token_id=bundle.tokenizer.pad_token_id)(examples)
    return {k: v.to(bundle.device) for k, v in batch.items()}


def train_step(policy, batch: dict[str, torch.Tensor], variant: str) -> float:
    """Forward (one or three passes), OSPO loss, backward; gradients are dropped so steps do not accumulate."""
    janus = policy.get_base_model()
    keys = ("prompt_ids", "prompt_mask", "image_tokens")
    # As OSPOTrainer.concatenated_forward: the LM runs through the wrapped model (`trunk`), the head on N positions.
    if variant == UNCHUNKED:
        per_token = image_token_logps(janus, *(batch[k] for k in keys), trunk=policy, head_chunk=None)  # (3B, N)
    elif variant == "one_concatenated_forward":
        per_token = image_token_logps(janus, *(batch[k] for k in keys), trunk=policy)  # (3B, N)
    else:
        parts = zip(*(batch[k].chunk(3) for k in keys))  # chosen, rejected, swapped rows: (B, T), (B, T), (B, N)
        per_token = torch.cat([image_token_logps(janus, ids, mask, tokens, trunk=policy)
                               for ids, mask, tokens in parts])
    ones = torch.ones_like(per_token)
    chosen, rejected, swapped = weighted_mean_logps(per_token, ones).chunk(3)  # (B,) each
    rows = chosen.shape[0]
    loss, _ = ospo_loss(chosen, rejected, swapped, per_token[:rows], ones[:rows], OSPOLossConfig())
    loss.backward()
    policy.zero_grad(set_to_none=True)
    return loss.item()


def run(size: str = "mid", pairs: int = 1, repeats: int = 2, device: str = "cpu", dtype=torch.float32,
        gradient_checkpointing: bool = False) -> dict:
    bundle = build_janus_for_bench(size, device=torch.device(device), dtype=dtype)
    return emit(**measure(bundle, size, pairs, repeats, gradient_checkpointing))


def measure(bundle, size: str, pairs: int, repeats: int, gradient_checkpointing: bool = False) -> dict:
    """Both variants side by side on `bundle` (whose model gets LoRA layers) -> the result line's fields."""
    params = parameter_count(bundle.model)
    policy = lora_policy(bundle, gradient_checkpointing)
    batch = pair_batch(bundle, pairs)
    rows, width = batch["prompt_ids"].shape
    tokens = rows * (width + bundle.num_image_tokens)
    print(f"training step: {size} ({params / 1e6:.0f}M params + LoRA), {pairs} pairs = {rows} "
          f"rows x {width + bundle.num_image_tokens} tokens, gradient checkpointing {gradient_checkpointing}",
          flush=True)
    fns = {v: (lambda v=v: train_step(policy, batch, v)) for v in (*VARIANTS, UNCHUNKED)}
    times, losses, peaks = side_by_side(fns, repeats, bundle.device)
    return dict(
        name="training_step_concatenated_vs_separate",
        baseline=summary("three forwards of B rows", times[VARIANTS[0]], peaks[VARIANTS[0]], tokens_per_s=tokens),
        ours=summary("one forward of 3B rows", times[VARIANTS[1]], peaks[VARIANTS[1]], tokens_per_s=tokens),
        ratios=ratios(times[VARIANTS[0]], times[VARIANTS[1]]),
        sizes={"model": size, "params_M": round(params / 1e6, 1), "pairs": pairs, "rows": rows,
               "tokens_per_row": width + bundle.num_image_tokens, "lora_r": 32,
               "gradient_checkpointing": gradient_checkpointing, "dtype": str(bundle.dtype)},
        device=bundle.device,
        memory_measure="growth of CUDA max_memory_allocated" if bundle.device.type == "cuda"
        else "growth of resident memory (VmHWM after malloc_trim)",
        same_loss=abs(losses[VARIANTS[0]] - losses[VARIANTS[1]]) <= 1e-3 * max(1.0, abs(losses[VARIANTS[0]])),
        # the chunked head's log-softmax (ours) against the same forward with the whole (3B, N, V) head at once
        unchunked_head=summary("one forward of 3B rows, head log-softmax unchunked", times[UNCHUNKED],
                               peaks[UNCHUNKED], tokens_per_s=tokens),
        ratio_vs_unchunked_head=round(min(w for w, _ in times[UNCHUNKED]) / min(w for w, _ in times[VARIANTS[1]]), 3),
        chunked_head_same_loss=abs(losses[UNCHUNKED] - losses[VARIANTS[1]]) <= 1e-4 * max(1.0, abs(losses[UNCHUNKED])),
    )


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, {"--pairs": dict(type=int, default=1),
                                      "--gradient-checkpointing": dict(action="store_true")})
    run(args.size, args.pairs, args.repeats, gradient_checkpointing=args.gradient_checkpointing)


if __name__ == "__main__":
    main()
