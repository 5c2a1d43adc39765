"""Image sampler vs transformers' own `generate(generation_mode="image")`: same model, prompts, batch, 576 tokens.

Both run greedy with guidance 5, so the tokens must be identical: on CPU (fp32) the benchmark fails if they are
not. The prompts all tokenize to the same length, because transformers' generate counts left padding in its
position ids and ours does not (a padded row is a different computation there, not a slower one).

    python -m bench.sampler [--size mid] [--batch 2] [--repeats 2] [--compile default]
"""

from __future__ import annotations

import itertools

import torch

from bench.harness import emit, parse_args, ratios, side_by_side, summary
from bench.models import build_janus_for_bench, parameter_count
from ospo_core.janus.image import gen_prompt_batch, sample_image_tokens

CFG = 5.0
COLORS = "red blue green yellow white black purple orange pink brown gray silver".split()
OBJECTS = ("cat dog bird horse car bus bench chair table book cup bottle apple banana flower tree house boat clock "
           "lamp").split()
BASELINE = "transformers_generate"


def equal_length_prompts(bundle, n: int) -> list[str]:
    """n distinct short prompts whose gen prompts all tokenize to the same length (no left padding)."""
    groups: dict[int, list[str]] = {}
    for color, obj in itertools.product(COLORS, OBJECTS):
        prompt = f"a {color} {obj}"
        _, mask = gen_prompt_batch(bundle, [prompt])
        groups.setdefault(mask.shape[1], []).append(prompt)
    largest = max(groups.values(), key=len)
    if len(largest) < n:
        raise ValueError(f"only {len(largest)} equal-length prompts available; ask for a batch of at most that")
    return largest[:n]


def measure(bundle, size: str, batch: int, repeats: int, compile_modes: tuple = (None,)) -> dict:
    """transformers' generate and our sampler (once per compile mode) side by side -> the result line's fields.

    `ours` is the first mode; the others are reported under `ours_<mode>`. A compiled mode is run once untimed
    first (compilation), and that time is reported.
    """
    prompts = equal_length_prompts(bundle, batch)
    ids, mask = gen_prompt_batch(bundle, prompts)  # (B, T), no padding

    def transformers_generate():
        return bundle.model.generate(input_ids=ids, attention_mask=mask, generation_mode="image",
                                     guidance_scale=CFG, do_sample=False)

    def ours(mode):
        return lambda: sample_image_tokens(bundle, prompts, cfg_weight=CFG, greedy=True, batch_size=batch,
                                           compile_mode=mode)

    names = {mode: "ours" if k == 0 else f"ours_{mode}" for k, mode in enumerate(compile_modes)}
    print(f"sampler: {size} ({parameter_count(bundle.model) / 1e6:.0f}M params), batch {batch}, "
          f"{bundle.num_image_tokens} tokens, guidance {CFG}, greedy, modes {list(compile_modes)}", flush=True)
    first_calls = {}
    for mode in filter(None, compile_modes):
        warm, _, _ = side_by_side({f"{names[mode]} (first call, compiles)": ours(mode)}, 1, bundle.device)
        first_calls[f"{names[mode]}_first_call_seconds"] = round(next(iter(warm.values()))[0][0], 1)
    fns = {BASELINE: transformers_generate, **{names[mode]: ours(mode) for mode in compile_modes}}
    times, results, peaks = side_by_side(fns, repeats, bundle.device)
    rates = {"images_per_s": batch, "tokens_per_s": batch * bundle.num_image_tokens}
    reference = results[BASELINE].cpu()
    fields = dict(
        name="sampler_vs_transformers_generate",
        baseline=summary("JanusForConditionalGeneration.generate(generation_mode='image')", times[BASELINE],
                         peaks[BASELINE], **rates),
        ours=summary(f"sample_image_tokens(compile_mode={compile_modes[0]!r})", times["ours"], peaks["ours"], **rates),
        ratios=ratios(times[BASELINE], times["ours"]),
        sizes={"model": size, "params_M": round(parameter_count(bundle.model) / 1e6, 1), "batch": batch,
               "image_tokens": bundle.num_image_tokens, "prompt_tokens": ids.shape[1], "dtype": str(bundle.dtype)},
        device=bundle.device,
        identical_greedy_tokens=bool(torch.equal(reference, results["ours"].cpu())),
        # bf16 on GPU: near-tied logits may round apart between the two implementations, so count agreement
        same_token_fraction=round(float((reference == results["ours"].cpu()).float().mean()), 4),
        **first_calls,
    )
    for mode in compile_modes[1:]:
        name = names[mode]
        fields[name] = summary(f"sample_image_tokens(compile_mode={mode!r})", times[name], peaks[name], **rates)
        fields[f"ratio_{name}"] = ratios(times[BASELINE], times[name])["ratio"]
        fields[f"{name}_same_tokens_as_ours"] = bool(torch.equal(results[name].cpu(), results["ours"].cpu()))
    return fields


def run(size: str = "mid", batch: int = 2, repeats: int = 2, device: str = "cpu", dtype=torch.float32,
        compile_mode: str | None = None) -> dict:
    """CPU benchmark: eager sampler (and `compile_mode`, if given) vs transformers; greedy tokens must match."""
    bundle = build_janus_for_bench(size, device=torch.device(device), dtype=dtype)
    record = emit(**measure(bundle, size, batch, repeats, (None, compile_mode) if compile_mode else (None,)))
    if not record["identical_greedy_tokens"]:
        raise AssertionError(f"greedy tokens differ from transformers' generate "
                             f"({record['same_token_fraction']:.2%} agree)")
    return record


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, {"--batch": dict(type=int, default=2), "--compile": dict(
        default=None, help="also time our sampler under this torch.compile mode")})
    run(args.size, args.batch, args.repeats, compile_mode=args.compile)


if __name__ == "__main__":
    main()
