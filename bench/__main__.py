"""`python -m bench`: every CPU benchmark in turn, one JSON result line each (4-6 minutes on 2 cores).

    python -m bench [--only text sampler scoring training] [--threads 1] [--compile default]

One torch thread by default: on a shared 2-core machine two OpenMP threads stall whenever another process holds
a core (single runs then take 2-5x longer), while one thread gives steady, comparable times.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import sampler, scoring, text, training

BENCHMARKS = {"text": text.run, "sampler": sampler.run, "scoring": scoring.run, "training": training.run}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compile", default=None, help="a torch.compile mode for our sampler (default: eager)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    for name in args.only:
        kwargs = {"compile_mode": args.compile} if name == "sampler" else {}
        BENCHMARKS[name](**kwargs)
    print(f"bench: {', '.join(args.only)} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
