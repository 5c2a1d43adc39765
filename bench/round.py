"""A reduced round end to end through the Prefect flow, each stage's seconds and share: where a round's time goes.

    python -m bench.round [--size mid|tiny|1b|7b] [--dtype bf16] [--set prompts.max_len=4 ...] [--write-profile cpu]

The default is the mid-size random Janus (58M parameters, 576 image tokens at 384 px, `bench/models.py`) saved to
a checkpoint folder, in a reduced round (REDUCED: two prompt sub-categories, one prompt each, 2 training steps;
16 minutes on 2 busy cores, 80% of it rendering); `--size tiny` runs the built-in model on the whole demo preset,
and `--size 1b --dtype bf16` on a GPU is the GPU smoke round (the first full round through the flow on a 1B-shaped
checkpoint, `compile_mode: auto`). The round is the demo preset (structured fallbacks, short text budgets, 8 training
steps) plus REDUCED for the random-weight sizes, plus `--set` overrides. Each stage's time is its Prefect task
run's; the work per stage is `ospo_core.estimate.work`, so the estimate for the same config is printed
beside it. `--write-profile NAME` records the measured per-stage throughputs and fixed costs for this size in
`ospo_core/data/profiles/NAME.json` (what `ospo estimate --device NAME` reads).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_OFFLINE": "1",
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}.items():
    os.environ.setdefault(_key, _value)

# The flow's task names per stage of ospo_core.estimate.STAGES.
TASKS = {"prompts": "generate-prompts", "perturb": "perturb", "densify": "densify", "render": "render",
         "questions": "questions", "vqa": "self-vqa", "select": "select-pairs", "train": "train"}


def stage_seconds(flow_run_id) -> dict[str, float]:
    """Seconds of each stage's task run(s) in the flow run (shards and retries summed)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_task = {}
    for run in runs:
        name = run.name.rsplit("-", 1)[0]
        by_task[name] = by_task.get(name, 0.0) + run.total_run_time.total_seconds()
    return {stage: by_task.get(task, 0.0) for stage, task in TASKS.items()}


def model_folder(size: str, dtype: str, root: Path) -> str:
    """'tiny', or a random-weight checkpoint folder of a benchmark size on this machine's device."""
    if size == "tiny":
        return "tiny"
    import torch

    from bench.models import build_janus_for_bench
    from ospo_core.janus.load import save_janus

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = build_janus_for_bench(size, device=device, dtype=getattr(torch, {"bf16": "bfloat16"}.get(dtype, dtype)))
    return str(save_janus(bundle, root / f"janus-{size}"))


def run_round(size: str, dtype: str, sets: list[str]):
    """One round through the flow -> (its config, seconds per stage, wall seconds)."""
    from flows.round import ospo_round
    from ospo_cli.main import validated
    from ospo_core.config import DEMO_OVERRIDES, RoundConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = validated(RoundConfig, json.loads(json.dumps(DEMO_OVERRIDES)),
                        [*sets, f"model={model_folder(size, dtype, root)}"], "round", "prompts.max_len=4")
        start = time.perf_counter()
        state = ospo_round(cfg, home=str(root / "home"), promote=False, return_state=True)
        wall = time.perf_counter() - start
        state.result()  # raises if the round failed
        return cfg, stage_seconds(state.state_details.flow_run_id), wall


def report(size: str, dtype: str, sets: list[str], cfg, seconds: dict[str, float], wall: float,
           device: str | None) -> dict:
    """Print each stage's seconds, share and work (and the estimate for the same config, given a profile)."""
    from ospo_core.estimate import estimate, work

    total = sum(seconds.values())
    amounts = work(cfg, size)
    record = {"name": "round_stage_seconds", "size": size, "dtype": dtype, "sets": sets, "wall_seconds": round(wall, 1),
              "stages": {s: {"seconds": round(t, 2), "share": round(t / total, 3), "work": amounts[s][0],
                             "unit": amounts[s][1]} for s, t in seconds.items()},
              "date": date.today().isoformat()}
    if device:
        record["estimate_seconds"] = {e.stage: round(e.seconds, 1) for e in estimate(cfg, size=size, device=device)}
    print(f"round ({size}, {' '.join(sets) or 'demo preset'}): {wall:.0f} s wall, stages {total:.0f} s")
    for stage, t in seconds.items():
        print(f"  {stage:<10} {t:8.1f} s  {t / total:6.1%}  {amounts[stage][0]:,.0f} {amounts[stage][1]}")
    print(json.dumps(record), flush=True)
    return record


# A random-weight model at benchmark size in a round a CPU finishes in minutes: 2 items x 3 negatives, 12 images.
REDUCED = ['prompts.sub_categories=["color1", "complex"]', "prompts.max_len=1", "train.max_steps=2",
           "train.save_steps=2", "train.batch_size=2"]
# The second, smaller round that --write-profile fits against: half the prompts, a third of the tokens and steps.
SMALL_POINT = ["prompts.max_len=1", "prompts.max_new_tokens=8", "perturb.max_new_tokens=8",
               "densify.max_new_tokens=8", "questions.max_new_tokens=8", "train.max_steps=2", "train.save_steps=2"]


def fit_profile(name: str, size: str, points: list[tuple[dict, dict]]) -> None:
    """Per stage, seconds = fixed cost + work / throughput, fitted through two rounds' (work, seconds); written
    into profile `name` for this size. A stage whose time did not grow with its work keeps only a fixed cost."""
    from ospo_core.estimate import PROFILES

    (work_a, secs_a), (work_b, secs_b) = points
    rates, overhead = {}, {}
    for stage in secs_a:
        dw, dt = work_a[stage][0] - work_b[stage][0], secs_a[stage] - secs_b[stage]
        if dw > 0 and dt > 0:
            rate = dw / dt
            fixed = secs_b[stage] - work_b[stage][0] / rate
            if fixed < 0:  # noise: no fixed cost, one throughput through both points
                rate, fixed = (work_a[stage][0] + work_b[stage][0]) / (secs_a[stage] + secs_b[stage]), 0.0
            rates[stage], overhead[stage] = round(rate, 4), round(fixed, 2)
        else:
            overhead[stage] = round((secs_a[stage] + secs_b[stage]) / 2, 2)
    path = PROFILES / f"{name}.json"
    profile = json.loads(path.read_text())
    basis = f"python -m bench.round --size {size} --write-profile {name}, {date.today().isoformat()}"
    profile["sizes"][size] = {"rates": rates, "overhead_s": overhead, "basis": dict.fromkeys(secs_a, basis)}
    path.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"bench.round: wrote the {size} figures of {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid", choices=["tiny", "mid", "1b", "7b"])
    parser.add_argument("--dtype", default="float32", help="bf16 or float32 (random-weight sizes)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--write-profile", default=None, metavar="NAME")
    args = parser.parse_args(argv)
    from ospo_cli.main import prefect_api

    with prefect_api():  # the CLI's temporary server (retried start) unless PREFECT_API_URL is set
        measure(args)


def measure(args) -> None:
    """The round (and for --write-profile the smaller one, and the fit), each reported."""
    from ospo_core.estimate import work

    if args.size != "tiny":
        args.sets = [*REDUCED, *args.sets]
    cfg, seconds, wall = run_round(args.size, args.dtype, args.sets)
    report(args.size, args.dtype, args.sets, cfg, seconds, wall, None)
    if args.write_profile:
        small_cfg, small_seconds, small_wall = run_round(args.size, args.dtype, [*args.sets, *SMALL_POINT])
        report(args.size, args.dtype, [*args.sets, *SMALL_POINT], small_cfg, small_seconds, small_wall, None)
        fit_profile(args.write_profile, args.size, [(work(cfg, args.size), seconds),
                                                    (work(small_cfg, args.size), small_seconds)])
        report(args.size, args.dtype, args.sets, cfg, seconds, wall, args.write_profile)


if __name__ == "__main__":
    main()
