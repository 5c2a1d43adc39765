"""Self-VQA scoring with a shared image prefix vs one full forward per question, 4 questions per image.

The baseline is `score_yes_no(..., shared_prefix=False)`: SigLIP and the whole ~600-token prompt run once per
question. Ours runs them once per image and packs its questions behind the cached prefix in the same row. The probabilities
must agree within 1e-5: the benchmark fails if they do not.

    python -m bench.scoring [--size mid] [--images 2] [--questions 4] [--repeats 2]
"""

from __future__ import annotations


import numpy as np
import torch
from PIL import Image

from bench.harness import emit, parse_args, ratios, side_by_side, summary
from bench.models import IMAGE_SIZE, build_janus_for_bench, parameter_count
from ospo_core.janus.score import score_yes_no

QUESTIONS = ["Is there a red apple?", "Is the apple on a wooden table?", "Are there two cats?",
             "Is the bus to the left of the house?", "Is the cup made of glass?", "Is there a dog?",
             "Are the flowers yellow?", "Is the clock above the door?"]
TOLERANCE = 1e-5


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def run(size: str = "mid", images: int = 2, questions: int = 4, repeats: int = 2, device: str = "cpu",
        dtype=torch.float32) -> dict:
    """CPU benchmark: both scorers side by side; their probabilities must agree within TOLERANCE."""
    bundle = build_janus_for_bench(size, device=torch.device(device), dtype=dtype)
    record = emit(**measure(bundle, size, images, questions, repeats))
    if not record["max_abs_prob_diff"] <= TOLERANCE:
        raise AssertionError(f"shared-prefix probabilities differ from full forwards by "
                             f"{record['max_abs_prob_diff']:.2e} > {TOLERANCE}")
    return record


def measure(bundle, size: str, images: int, questions: int, repeats: int) -> dict:
    """Both scorers side by side on `bundle` -> the result line's fields."""
    imgs = noise_images(images)
    qs = [[QUESTIONS[(i + k) % len(QUESTIONS)] for k in range(questions)] for i in range(images)]
    fns = {
        "full_forward_per_question": lambda: score_yes_no(bundle, imgs, qs, shared_prefix=False, batch_size=images),
        "shared_prefix": lambda: score_yes_no(bundle, imgs, qs, shared_prefix=True, batch_size=images),
    }
    print(f"scoring: {size} ({parameter_count(bundle.model) / 1e6:.0f}M params), {images} images x {questions} "
          f"questions", flush=True)
    times, results, peaks = side_by_side(fns, repeats, bundle.device)
    diff = (torch.tensor(results["full_forward_per_question"]) - torch.tensor(results["shared_prefix"])).abs().max()
    pairs = images * questions
    return dict(
        name="self_vqa_shared_prefix_vs_full_forward",
        baseline=summary("score_yes_no(shared_prefix=False)", times["full_forward_per_question"],
                         peaks["full_forward_per_question"], pairs_per_s=pairs),
        ours=summary("score_yes_no(shared_prefix=True)", times["shared_prefix"], peaks["shared_prefix"],
                     pairs_per_s=pairs),
        ratios=ratios(times["full_forward_per_question"], times["shared_prefix"]),
        sizes={"model": size, "params_M": round(parameter_count(bundle.model) / 1e6, 1), "images": images,
               "questions_per_image": questions, "image_tokens": bundle.num_image_tokens, "dtype": str(bundle.dtype)},
        device=bundle.device,
        max_abs_prob_diff=float(diff),
        # each image's questions share its one cache row: peak close to one full forward per question (target 1.5x)
        peak_memory_ratio=round(peaks["shared_prefix"] / max(peaks["full_forward_per_question"], 1), 3),
    )


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, {"--images": dict(type=int, default=2), "--questions": dict(type=int, default=4)})
    run(args.size, args.images, args.questions, args.repeats)


if __name__ == "__main__":
    main()
