"""GPU benchmarks at Janus-Pro-1B and -7B sizes (random weights, bf16), one JSON result line per point.

For each size: the text engine (a perturbation stage's few-shot chats, 128 new tokens, `compile_mode="auto"`) at
64 and 256 chats per batch against its memory-bandwidth bound; the sampler at 1, 16, 64 and 128 images per batch
against transformers' generate and against the memory-bandwidth bound (below); self-VQA (image, question) pairs per
second, shared prefix vs full forwards; a LoRA training step (one 3B-row forward vs three) in tokens/s and model
FLOP utilisation; peak memory at every point.
Run it through `bench/gpu.sh`, which installs the pinned packages first; `--dry-run` runs the same code on the
CPU at toy size, to check the script without a GPU.

    python -m bench.gpu [--sizes 1b 7b] [--points text sampler scoring training] [--batches 1 16 64 128]
                        [--text-batches 64 256] [--compile reduce-overhead] [--budget-s 480]

Text bound: a decode step reads the LM's weights and lm_head once and every row's keys/values (prefix + suffix +
half the answer on average); b rows give b tokens per step.

Bandwidth bound of the sampler (`ospo_core.janus.image.sampling_bytes_per_step`): a step must read the weights it
uses once (LM layers, generation head and aligner) and every row's keys/values written so far, T + 287.5 positions
on average over a 576-token image. With B the measured device-to-device copy bandwidth (bytes read + written per
second), a batch of b images takes at least 576 * (weight bytes + average KV bytes) / B seconds.

Model FLOPs of a LoRA step: the base weights are frozen, so backward computes input gradients only: 4 FLOPs per
weight per token (2 forward, 2 backward), plus attention 12 * layers * width * sequence per token (forward and
backward, full square as in nanoGPT/PaLM), plus 4 per generation-head weight per image position. Recomputation
under gradient checkpointing is not counted (MFU, not hardware utilisation). Peak: the card's dense bf16 figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from functools import partial

import torch

import itertools

from bench import sampler, scoring, training
from bench.harness import emit
from bench.models import build_janus_for_bench, parameter_count
from ospo_core.janus.image import sampling_bytes_per_step
from ospo_core.janus.memory import kv_bytes_per_position
from ospo_core.janus.text import generate_tokens
from ospo_core.templates import negative_chat

# Dense bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; the first name found in the device name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
                    ("A100", 312.0), ("L40S", 362.0))
# Per size: scoring images (4 questions each), training pairs (3 rows each), gradient checkpointing.
PLAN = {
    "1b": dict(images=16, pairs=8, checkpointing=False),
    "7b": dict(images=16, pairs=4, checkpointing=True),  # 12 rows x 600 tokens of 7B activations: checkpoint
    "toy": dict(images=2, pairs=1, checkpointing=False),
}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes read + written per second by a device-to-device copy of `gib` GiB (best of 10 after 3 warm-ups)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def resident_mib(device: torch.device) -> float | None:
    """CUDA memory allocated before a point (the weights, mostly): add a point's peak growth for its total."""
    return round(torch.cuda.memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def lora_step_flops(bundle, rows: int, tokens_per_row: int) -> float:
    """Model FLOPs of one LoRA training step over `rows` sequences (see the module docstring)."""
    janus = bundle.model.model
    cfg = bundle.model.config.text_config
    lm = sum(p.numel() for n, p in janus.language_model.layers.named_parameters() if "lora_" not in n)
    head = parameter_count(janus.generation_head) + parameter_count(janus.generation_aligner)
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * tokens_per_row
    per_row = 4 * lm * tokens_per_row + attention * tokens_per_row + 4 * head * bundle.num_image_tokens
    return rows * per_row


def attempt(name: str, fn, deadline: float, failures: list[str], device: torch.device) -> None:
    """Run one point unless the time budget is spent. A failure (an OOM, say) is printed as the point's result line
    and counted, and the points after it still run: the script exits non-zero at the end."""
    if time.monotonic() > deadline:
        print(json.dumps({"name": name, "skipped": "time budget spent (--budget-s)"}), flush=True)
        return
    try:
        fn()
    except Exception as exc:  # one failing point must not take the others with it; reported, not dropped
        failures.append(name)
        traceback.print_exc()
        print(json.dumps({"name": name, "error": f"{type(exc).__name__}: {exc}"[:1000]}), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sampler_point(bundle, size, batch, modes, bandwidth) -> None:
    resident = resident_mib(bundle.device)
    fields = sampler.measure(bundle, size, batch, repeats=2 if batch < 64 else 1, compile_modes=modes)
    weights, kv = sampling_bytes_per_step(bundle.model, batch, fields["sizes"]["prompt_tokens"])
    bound = batch / (bundle.num_image_tokens * (weights + kv) / bandwidth)
    ours = [fields["ours"]] + [fields[f"ours_{mode}"] for mode in modes[1:]]
    emit(**fields, copy_bandwidth_GBps=round(bandwidth / 1e9, 1), weight_bytes_per_step=weights,
         kv_bytes_per_step_avg=round(kv), bound_images_per_s=round(bound, 3),
         fraction_of_bound=round(max(side["images_per_s"] for side in ours) / bound, 3), resident_before_MiB=resident)


def text_point(bundle, size, batch, bandwidth, new_tokens: int = 128) -> None:
    """Our text engine on `batch` perturbation chats at once (CUDA graphs under "auto"): new tokens per second
    against the bandwidth bound. The first call compiles and is timed apart."""
    from bench.harness import side_by_side, summary

    places = ("on a table", "in a park", "by the sea")
    chats = [negative_chat("attribute1_color", "replace", f"a {c} {o} {p}", seed=0)
             for c, o, p in itertools.product(sampler.COLORS, sampler.OBJECTS, places)][:batch]
    run = partial(generate_tokens, bundle, chats, greedy=True, max_new_tokens=new_tokens, batch_size=batch,
                  compile_mode="auto")
    resident = resident_mib(bundle.device)
    first, _, _ = side_by_side({"first call (compiles)": run}, 1, bundle.device)
    times, results, peaks = side_by_side({"ours": run}, 1, bundle.device)
    tokens = sum(len(row) for row in results["ours"])
    prompt = len(bundle.tokenizer(bundle.processor.apply_chat_template(chats[0], add_generation_prompt=True,
                                                                       tokenize=False))["input_ids"])
    lm = bundle.model.model.language_model
    weights = sum(p.numel() * p.element_size() for m in (lm.layers, lm.norm, bundle.model.lm_head)
                  for p in m.parameters())
    kv = batch * kv_bytes_per_position(bundle.model) * (prompt + new_tokens / 2)
    bound = batch / ((weights + kv) / bandwidth)  # tokens/s
    fields = summary("generate_tokens(compile_mode='auto')", times["ours"], peaks["ours"], tokens_per_s=tokens)
    emit(name="text_engine_vs_bandwidth_bound", baseline={"what": "bandwidth bound", "tokens_per_s": round(bound, 1)},
         ours=fields, ratios={"fraction_of_bound": round(fields["tokens_per_s"] / bound, 3)},
         sizes={"model": size, "chats": batch, "prompt_tokens": prompt, "max_new_tokens": new_tokens,
                "generated_tokens": tokens, "dtype": str(bundle.dtype)},
         device=bundle.device, first_call_seconds=round(first["first call (compiles)"][0][0], 1),
         copy_bandwidth_GBps=round(bandwidth / 1e9, 1), resident_before_MiB=resident)


def scoring_point(bundle, size, images) -> None:
    resident = resident_mib(bundle.device)
    emit(**scoring.measure(bundle, size, images, 4, repeats=2), resident_before_MiB=resident)


def training_point(bundle, size, plan, flops_peak) -> None:
    resident = resident_mib(bundle.device)
    fields = training.measure(bundle, size, plan["pairs"], repeats=2, gradient_checkpointing=plan["checkpointing"])
    flops = lora_step_flops(bundle, 3 * plan["pairs"], fields["sizes"]["tokens_per_row"])
    mfu = {side: round(flops / fields[side]["seconds"] / flops_peak, 4) if flops_peak else None
           for side in ("baseline", "ours")}
    emit(**fields, model_flops_per_step=flops, peak_flops=flops_peak, mfu_baseline=mfu["baseline"],
         mfu=mfu["ours"], resident_before_MiB=resident)


def run_size(size, args, device, dtype, bandwidth, flops_peak, deadline, failures) -> None:
    plan = dict(PLAN[size])
    if args.train_pairs:
        plan["pairs"] = args.train_pairs
    if args.checkpointing != "plan":
        plan["checkpointing"] = args.checkpointing == "on"
    start = time.perf_counter()
    bundle = build_janus_for_bench(size, device=device, dtype=dtype)
    print(f"gpu: built {size} ({parameter_count(bundle.model) / 1e9:.2f}B params) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    points = [(f"{size}: text, batch {batch}", partial(text_point, bundle, size, batch, bandwidth))
              for batch in args.text_batches if "text" in args.points]
    points += [(f"{size}: sampler, batch {batch}",
               partial(sampler_point, bundle, size, batch,
                       (None, *args.compile) if batch in args.compile_batches else (None,), bandwidth))
              for batch in args.batches if "sampler" in args.points]
    points += [(f"{size}: scoring", partial(scoring_point, bundle, size, plan["images"]))] * ("scoring" in args.points)
    points += [(f"{size}: training", partial(training_point, bundle, size, plan, flops_peak))] * (
        "training" in args.points)  # last: it adds LoRA to the model
    for name, fn in points:
        attempt(name, fn, deadline, failures, device)
    del bundle, points
    gc.collect()
    torch._dynamo.reset()  # compiled steps hold the model's guards; the next size starts clean
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1b", "7b"], choices=sorted(PLAN))
    parser.add_argument("--points", nargs="+", default=["text", "sampler", "scoring", "training"],
                        choices=["text", "sampler", "scoring", "training"],
                        help="which benchmarks to run (e.g. to rerun one)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 128])
    parser.add_argument("--text-batches", nargs="+", type=int, default=[64, 256], help="chats per text batch")
    parser.add_argument("--compile", nargs="*", default=None,
                        help="torch.compile modes to time beside eager (default reduce-overhead; none given: eager "
                             "only; --dry-run: eager only unless given)")
    parser.add_argument("--compile-batches", nargs="*", type=int, default=[64, 128],
                        help="sampler batch sizes at which the compile modes are timed (each compiles anew)")
    parser.add_argument("--train-pairs", type=int, default=None, help="pairs per training step (default: the plan's)")
    parser.add_argument("--checkpointing", choices=["plan", "on", "off"], default="plan",
                        help="gradient checkpointing of the training point (plan: off for 1b, on for 7b)")
    parser.add_argument("--budget-s", type=float, default=480, help="start no new point after this many seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the card, if not in the table")
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, toy size, batches 1 2")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = [] if args.dry_run else ["reduce-overhead"]
    if args.dry_run:
        args.sizes, args.batches, args.text_batches = ["toy"], [1, 2], [2]
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device (or --dry-run to check the script on the CPU)")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    deadline = time.monotonic() + args.budget_s
    bandwidth = copy_bandwidth(device, gib=0.25 if args.dry_run else 2.0)
    flops_peak = peak_flops(device, args.peak_tflops)
    print(f"gpu: device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s, bf16 peak {flops_peak / 1e12 if flops_peak else '?'} TFLOP/s", flush=True)
    failures: list[str] = []
    for size in args.sizes:
        attempt(size, partial(run_size, size, args, device, dtype, bandwidth, flops_peak, deadline, failures),
                deadline, failures, device)
    if failures:
        raise SystemExit(f"gpu: {len(failures)} point(s) failed: {failures}")


if __name__ == "__main__":
    main()
