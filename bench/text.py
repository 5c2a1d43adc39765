"""A text stage at its real shape vs transformers' own `generate`: the perturbation stage's few-shot chats.

16 chats of one template family (the stage-2a "replace" chat of the colour family: system prompt, three few-shot
turns, then each chat's own prompt), greedy, 128 new tokens each, one batch. transformers' `generate` runs the
whole prompt of every chat; `generate_text` runs the shared prefix once and each chat's own suffix, then decodes
with continuous batching. Greedy tokens must be identical (the benchmark fails if not). The prompts tokenize to one
length, because transformers' generate counts left padding in its position ids and ours does not.

    python -m bench.text [--size mid] [--chats 16] [--new-tokens 128] [--repeats 2]
"""

from __future__ import annotations

import itertools

import torch

from bench.harness import emit, parse_args, ratios, side_by_side, summary
from bench.models import build_janus_for_bench, parameter_count
from bench.sampler import COLORS, OBJECTS
from ospo_core.janus.chat import render_chat
from ospo_core.janus.text import generate_tokens
from ospo_core.templates import negative_chat

BASELINE = "transformers_generate"


def stage_chats(bundle, n: int) -> list[list[dict]]:
    """n distinct perturbation chats (one family) whose prompts all tokenize to the same length."""
    groups: dict[int, list[list[dict]]] = {}
    for color, obj, place in itertools.product(COLORS, OBJECTS, ("on a table", "in a park", "by the sea")):
        chat = negative_chat("attribute1_color", "replace", f"a {color} {obj} {place}", seed=0)
        groups.setdefault(len(bundle.tokenizer(render_chat(bundle.processor, chat))["input_ids"]), []).append(chat)
    largest = max(groups.values(), key=len)
    if len(largest) < n:
        raise ValueError(f"only {len(largest)} equal-length chats available; ask for at most that many")
    return largest[:n]


def measure(bundle, size: str, chats: int, new_tokens: int, repeats: int) -> dict:
    convs = stage_chats(bundle, chats)
    tok = bundle.tokenizer
    enc = tok([render_chat(bundle.processor, c) for c in convs], return_tensors="pt").to(bundle.device)  # (B, T)
    first, second = enc["input_ids"][:2].tolist() if chats > 1 else (enc["input_ids"][0].tolist(), [])
    shared = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), 0)

    def transformers_generate():
        out = bundle.model.generate(**enc, generation_mode="text", max_new_tokens=new_tokens, min_new_tokens=0,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
        return out[:, enc["input_ids"].shape[1] :]

    def ours():
        return generate_tokens(bundle, convs, greedy=True, max_new_tokens=new_tokens, batch_size=chats)

    print(f"text: {size} ({parameter_count(bundle.model) / 1e6:.0f}M params), {chats} chats x "
          f"{enc['input_ids'].shape[1]} prompt tokens ({shared} shared), {new_tokens} new tokens, greedy", flush=True)
    times, results, peaks = side_by_side({BASELINE: transformers_generate, "ours": ours}, repeats, bundle.device)
    reference = [row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                 for row in results[BASELINE].tolist()]  # generate pads after EOS
    generated = sum(len(row) for row in results["ours"])
    return dict(
        name="text_stage_vs_transformers_generate",
        baseline=summary("JanusForConditionalGeneration.generate(generation_mode='text')", times[BASELINE],
                         peaks[BASELINE], chats_per_s=chats),
        ours=summary("generate_tokens (shared prefix, slot cache, continuous batching)", times["ours"], peaks["ours"],
                     chats_per_s=chats),
        ratios=ratios(times[BASELINE], times["ours"]),
        sizes={"model": size, "params_M": round(parameter_count(bundle.model) / 1e6, 1), "chats": chats,
               "prompt_tokens": enc["input_ids"].shape[1], "shared_prefix_tokens": shared,
               "max_new_tokens": new_tokens, "generated_tokens": generated, "dtype": str(bundle.dtype)},
        device=bundle.device,
        identical_greedy_tokens=reference == results["ours"],
    )


def run(size: str = "mid", chats: int = 16, new_tokens: int = 128, repeats: int = 2, device: str = "cpu",
        dtype=torch.float32) -> dict:
    """CPU benchmark: both side by side; greedy texts must be identical."""
    bundle = build_janus_for_bench(size, device=torch.device(device), dtype=dtype)
    record = emit(**measure(bundle, size, chats, new_tokens, repeats))
    if not record["identical_greedy_tokens"]:
        raise AssertionError("generate_text's greedy text differs from transformers' generate")
    return record


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, {"--chats": dict(type=int, default=16),
                                      "--new-tokens": dict(type=int, default=128)})
    run(args.size, args.chats, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
