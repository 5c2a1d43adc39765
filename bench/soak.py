"""Soak test: many tiny rounds back to back through the nightly flow; not part of the test suite.

    python -m bench.soak --rounds 20 --home /tmp/ospo-soak [--keep 5]

Each night is one run of the `ospo-self-improve` flow (one round, starting from the latest promoted model); the
script reports failures, time per round and disk growth, and prunes old round folders with the retention
setting (promoted lineages are never pruned). Ends with one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}.items():
    os.environ.setdefault(key, value)

# A night on the tiny model that takes well under a minute: four sub-categories, short text budgets.
NIGHT = {
    "prompts": {"sub_categories": ["color1", "2D_spatial", "numeracy2", "complex"], "max_new_tokens": 8, "repeat": 2},
    "perturb": {"max_new_tokens": 8}, "densify": {"max_new_tokens": 8}, "questions": {"max_new_tokens": 8},
    "train": {"max_steps": 2, "save_steps": 2},
}


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--home", default="/tmp/ospo-soak")
    parser.add_argument("--keep", type=int, default=5, help="round folders kept by retention (promoted lineage kept)")
    args = parser.parse_args(argv)

    from ospo_core import store
    from ospo_core.config import (
        DEMO_OVERRIDES, EVAL_DEMO_OVERRIDES, EvalConfig, RoundConfig, SelfImproveConfig, deep_update,
    )
    from flows.self_improve import self_improve

    home = Path(args.home)
    shutil.rmtree(home, ignore_errors=True)
    config = SelfImproveConfig(
        rounds=1, round_prefix="soak", round=RoundConfig.model_validate(deep_update(DEMO_OVERRIDES, NIGHT)),
        eval=EvalConfig.model_validate(deep_update(EVAL_DEMO_OVERRIDES, {"prompt_set": "geneval", "limit": 1,
                                                                          "questions": {"max_new_tokens": 8}})),
    )
    seconds, failures, sizes = [], [], []
    for night in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        try:
            self_improve(config, home=str(home))
        except Exception as exc:  # a soak counts failures and goes on, like a scheduler would
            failures.append({"night": night, "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
        seconds.append(time.perf_counter() - t0)
        pruned = store.prune_rounds(home, keep_last=args.keep)
        sizes.append(disk_usage(home))
        print(f"night {night}: {seconds[-1]:.1f}s, {sizes[-1] / 1e6:.1f} MB under {home}, pruned {pruned or '-'}",
              flush=True)
    result = {
        "name": "soak", "rounds": args.rounds, "failures": len(failures), "failure_details": failures,
        "seconds_per_round_mean": sum(seconds) / len(seconds), "seconds_per_round_max": max(seconds),
        "disk_bytes_first": sizes[0], "disk_bytes_last": sizes[-1],
        "disk_growth_per_round_after_retention": (sizes[-1] - sizes[min(args.keep, len(sizes) - 1)])
        / max(len(sizes) - 1 - min(args.keep, len(sizes) - 1), 1),
        "promoted": sum(e["promoted"] for e in store.list_entries(home)),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
