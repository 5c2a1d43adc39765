"""What every benchmark shares: side-by-side timing, peak memory, the device label and the one JSON result line.

Timing runs the baseline and our version in turn, `repeats` times each, in one process, and keeps each one's best
(least disturbed) wall-clock time: on a shared 2-core machine other processes slow single runs by 2x and more, and
interleaving makes that noise hit both sides alike. Process CPU time is kept too (with one torch thread it is the
work done, whatever else runs), and every run is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import time
from collections.abc import Callable
from datetime import date

import torch


def parse_args(doc: str, argv, options: dict[str, dict]) -> argparse.Namespace:
    """A benchmark's command line: --size, --repeats, --threads, then `options` ({flag: add_argument keywords});
    sets the torch thread count (one by default, see bench/__main__.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size", default="mid")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see bench/__main__.py)")
    for flag, keywords in options.items():
        parser.add_argument(flag, **keywords)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(fns: dict[str, Callable], repeats: int, device: torch.device) -> tuple[dict, dict, dict]:
    """Run each fn in turn, `repeats` rounds.

    Returns ({name: [(wall seconds, process CPU seconds) per run]}, {name: last result}, {name: peak memory growth
    in bytes}). Peak memory is taken in the first round, which is a cold one anyway: on CPU measuring it hands
    freed memory back to the OS, and the next call pays page faults to take it again. With one torch thread the
    CPU seconds are the work done, whatever else the machine runs; the wall seconds are what a user waits.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    results, peaks = {}, {}
    for round_ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            if round_ == 0:
                results[name], peaks[name] = peak_memory(fn, device)
            else:
                results[name] = fn()
            sync(device)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            print(f"  round {round_ + 1}/{repeats} {name}: {times[name][-1][0]:.2f} s wall, {times[name][-1][1]:.2f} s "
                  f"CPU" + (f", peak +{peaks[name] / 2**20:.0f} MiB" if round_ == 0 else ""), flush=True)
    return times, results, peaks


def best(runs: list[tuple[float, float]]) -> float:
    """The least disturbed wall time."""
    return min(wall for wall, _ in runs)


def best_cpu(runs: list[tuple[float, float]]) -> float:
    return min(cpu for _, cpu in runs)


def ratios(baseline: list[tuple[float, float]], ours: list[tuple[float, float]]) -> dict:
    """Speed-up of ours over the baseline by best wall time (`ratio`) and by best process CPU time (`cpu_ratio`)."""
    return {"ratio": round(best(baseline) / best(ours), 3), "cpu_ratio": round(best_cpu(baseline) / best_cpu(ours), 3)}


def summary(what: str, runs: list[tuple[float, float]], peak_bytes: int, **counts: float) -> dict:
    """One side of a result line: best times, every run, peak memory, and `<count>` / best wall time per count."""
    fastest = best(runs)
    return {"what": what, "seconds": round(fastest, 3), "cpu_seconds": round(best_cpu(runs), 3),
            "runs": [round(wall, 3) for wall, _ in runs], "peak_memory_MiB": round(peak_bytes / 2**20, 1),
            **{name: round(count / fastest, 4) for name, count in counts.items()}}


def gpu_peak(fn: Callable, device: torch.device) -> tuple[object, int]:
    """(fn(), bytes allocated at the peak of the call above what was allocated before it) on a CUDA device."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - before


def cpu_peak(fn: Callable) -> tuple[object, int]:
    """(fn(), growth of resident memory at the peak of the call) on Linux.

    Freed memory is first handed back to the OS (`malloc_trim`), so that the call cannot reuse pages freed
    earlier without showing them; then the kernel's high-water mark is reset (`/proc/self/clear_refs`, "5") and
    read back after the call.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    return out, _proc_status("VmHWM") - before


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}; peak memory is measured on Linux only")


def peak_memory(fn: Callable, device: torch.device) -> tuple[object, int]:
    return gpu_peak(fn, device) if device.type == "cuda" else cpu_peak(fn)


def emit(name: str, *, baseline: dict, ours: dict, ratios: dict, sizes: dict, device: torch.device, **extra) -> dict:
    """Print the benchmark's one JSON result line (and return it)."""
    record = {"name": name, "baseline": baseline, "ours": ours, **ratios, "sizes": sizes,
              "device": device_label(device), "date": date.today().isoformat(), **extra}
    print(json.dumps(record), flush=True)
    return record
