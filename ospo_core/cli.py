"""The `ospo` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _smoke(args: argparse.Namespace) -> int:
    """Exercise every entry point of the model layer once and say what happened."""
    from ospo_core.janus.chat import few_shot_chat
    from ospo_core.janus.image import sample_images
    from ospo_core.janus.load import load_janus
    from ospo_core.janus.score import encode_images, image_logprobs, score_yes_no
    from ospo_core.janus.text import generate_text

    t0 = time.perf_counter()
    bundle = load_janus(args.model)
    print(f"loaded {bundle.source} on {bundle.device} ({bundle.dtype}), fingerprint {bundle.fingerprint}, "
          f"{sum(p.numel() for p in bundle.model.parameters()):,} parameters, {bundle.num_image_tokens} image tokens")
    chat = few_shot_chat("You write short image prompts.", [], "Write one prompt about a red apple.")
    text = generate_text(bundle, [chat], seed=0, max_new_tokens=16)[0]
    print(f"generate_text -> {text!r}")
    prompts = ["a red apple on a wooden table", "two cats to the left of a dog"]
    samples = sample_images(bundle, prompts, seed=[0, 1])
    print(f"sample_images -> tokens {tuple(samples.tokens.shape)}, images {[im.size for im in samples.images]}")
    scores = score_yes_no(bundle, samples.images, [["Is there a red apple?"], ["Are there two cats?", "Is there a dog?"]])
    print(f"score_yes_no -> {[[(round(y, 4), round(n, 4)) for y, n in row] for row in scores]}")
    _, mean = image_logprobs(bundle, prompts, samples.tokens)
    print(f"image_logprobs -> mean log-likelihood per image {[round(v, 4) for v in mean.tolist()]}")
    print(f"encode_images -> {tuple(encode_images(bundle, samples.images).shape)}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ospo", description="OSPO self-improvement rounds for Janus-Pro")
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help="run each model-layer function once on a model and print what it did")
    smoke.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint folder")
    smoke.set_defaults(func=_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ospo_core.janus.load import ModelLoadError

    try:
        return args.func(args)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
