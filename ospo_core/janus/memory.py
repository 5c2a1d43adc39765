"""Batch sizes from memory: how many rows of a KV-cached sampler fit the free memory of the device.

On a GPU a decode step reads the weights once whatever the batch, so the batch should be as large as memory allows
(the step is bandwidth-bound until then); on a CPU every row costs compute and a small batch is as fast per row.
`batch_size="auto"` means: by free memory on a GPU (capped), `CPU_BATCH` on a CPU. The size an "auto" call last
chose is remembered per process, so a CUDA out-of-memory back-off can halve it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("ospo.memory")

KV_BLOCK = 64  # attention reads caches in blocks of this many positions (fewer distinct shapes to compile)
CPU_BATCH = 16  # rows per batch on a CPU: compute-bound there, larger batches gain little and cost memory
GPU_MAX_BATCH = 256  # beyond this a decode step is no longer bandwidth-bound on an H100/H200-class card
FREE_FRACTION = 0.6  # share of the free memory a batch may take (the rest: activations, allocator slack)

_last_auto: dict[str, int] = {}


def round_up(n: int, block: int = KV_BLOCK) -> int:
    return -(-n // block) * block


def kv_bytes_per_position(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of keys + values one row holds per cached position, over all LM layers."""
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = (dtype or model.dtype).itemsize
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize


def auto_batch(kind: str, device: torch.device, per_row_bytes: int, *, limit: int, reserve_bytes: int = 0) -> int:
    """Rows per batch for an "auto" batch size: by free GPU memory (at most GPU_MAX_BATCH), CPU_BATCH on a CPU;
    never more than `limit` (the rows there are)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = int(max(free - reserve_bytes, 0) * FREE_FRACTION // max(per_row_bytes, 1))
        size = max(1, min(GPU_MAX_BATCH, fits))
        log.info("%s: %d rows per batch (%.1f GiB free, %.1f MiB per row)", kind, size, free / 2**30,
                 per_row_bytes / 2**20)
    else:
        size = CPU_BATCH
    size = max(1, min(size, limit))
    _last_auto[kind] = size
    return size


def last_auto_batch(default: int = CPU_BATCH) -> int:
    """The largest batch an "auto" size chose in this process (what an out-of-memory back-off halves)."""
    return max(_last_auto.values(), default=default)


def resolve_batch(batch_size: int | str, kind: str, device: torch.device, per_row_bytes: int, *, limit: int,
                  reserve_bytes: int = 0) -> int:
    """An explicit batch size (capped at `limit`), or "auto" (see `auto_batch`)."""
    if batch_size == "auto":
        return auto_batch(kind, device, per_row_bytes, limit=limit, reserve_bytes=reserve_bytes)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return max(1, min(batch_size, limit))
