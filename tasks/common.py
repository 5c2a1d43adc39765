"""What every stage task shares: the round context, the cache key, atomic (sharded) writes, OOM back-off, reports.

A task body is a few lines: read its input tables, call one `ospo_core` function through `run_stage`, and return
the small manifest `run_stage` gives back ({table, path, rows, hash, key}); never tensors or images.

Caching: the key of a stage is a hash of the stage name, the stage's code (its module and template files), its
config, the content hashes of its input tables, the model fingerprint and the round id. A cached manifest is only
trusted while the table it points to is intact: `stage_cache_key` compares the files on disk with the marker written
when the table was finished and returns a fresh, unmatchable key when they differ, so the stage recomputes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from ospo_core import store
from ospo_core.config import ExecutionConfig
from ospo_core.records import SCHEMAS

MARKER = "_stage.json"  # written last, when every shard of a table is finished


class StageContext(BaseModel):
    """The round a stage belongs to and the model it runs with (small and serialisable: a task parameter)."""

    round_id: str
    home: str
    model: str
    adapters: tuple[str, ...] = ()
    fingerprint: str
    shard_rows: int = 64
    execution: ExecutionConfig = ExecutionConfig()  # how, not what: no table depends on it (see StageSpec)

    @property
    def round_path(self) -> Path:
        return store.round_dir(Path(self.home), self.round_id)


# ---------------------------------------------------------------- models (one per process, loaded on first use)

_BUNDLES: dict[tuple, Any] = {}


def bundle_for(ctx: StageContext):
    """The model of this round, loaded once per process (stages share it; training loads its own copy)."""
    from ospo_core.janus.load import load_janus

    key = (ctx.model, ctx.adapters)
    if key not in _BUNDLES:
        _BUNDLES.clear()  # one model in memory at a time
        _BUNDLES[key] = load_janus(ctx.model, adapters=ctx.adapters)
    bundle = _BUNDLES[key]
    if bundle.fingerprint != ctx.fingerprint:
        raise RuntimeError(
            f"model {ctx.model} + {len(ctx.adapters)} adapters now has fingerprint {bundle.fingerprint}, but the round "
            f"started with {ctx.fingerprint}: the weights changed under a running round; start a new round"
        )
    return bundle


# ---------------------------------------------------------------- cache keys


def code_version(*objects: Any) -> str:
    """Hash of the source files that define `objects` (modules or functions) and the template data files."""
    h = hashlib.sha256()
    paths = {Path(inspect.getfile(o)) for o in objects}
    templates = Path(__file__).resolve().parent.parent / "ospo_core" / "templates"
    paths |= set(templates.glob("*.json"))
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: str, code: str, ctx: StageContext, cfg: BaseModel | None, inputs: dict[str, dict | None],
              execution: tuple[str, ...] = ()) -> str:
    document = {
        "stage": stage,
        "code": code,
        "round": [ctx.home, ctx.round_id],
        "model": ctx.fingerprint,
        "shard_rows": ctx.shard_rows,
        "config": cfg.model_dump(mode="json") if cfg is not None else None,
        "inputs": {name: (ref or {}).get("hash") for name, ref in sorted(inputs.items())},
    }
    if execution:
        document["execution"] = {name: getattr(ctx.execution, name) for name in execution}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _files_stat(directory: Path, extra: list[str] = ()) -> list:
    """(name, size, mtime) of a table's shards and of any extra output files (e.g. the adapter of training)."""
    files = sorted(directory.glob("part-*.parquet")) + [Path(p) for p in extra]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else [str(p), None, None] for p in files]


def _marker_intact(directory: Path, key: str) -> bool:
    marker = directory / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return recorded.get("key") == key and recorded.get("files") == _files_stat(directory, recorded.get("extra", []))


def cache_key_for(spec: "StageSpec") -> Callable:
    """Prefect cache key of a stage: its key while its table is intact on disk, else a key nothing has stored."""

    def stage_cache_key(context, parameters: dict) -> str:
        ctx: StageContext = parameters["ctx"]
        key = spec.key(ctx, parameters.get("cfg"), parameters)
        if not _marker_intact(store.table_dir(ctx.round_path, spec.table), key):
            _forget_cached_result(context, key)
        return key

    return stage_cache_key


def _forget_cached_result(context, key: str) -> None:
    """Drop the stored result of `key` so the stage recomputes (and its new result is stored under the same key)."""
    result_store = getattr(context, "result_store", None)
    storage = result_store and (result_store.metadata_storage or result_store.result_storage)
    basepath = getattr(storage, "basepath", None)
    if basepath is None:
        raise RuntimeError(
            "ospo stages cache their manifests in local result storage; configure a local result storage path "
            f"(got {type(storage).__name__})"
        )
    (Path(basepath).expanduser() / key).unlink(missing_ok=True)


@dataclass(frozen=True)
class StageSpec:
    """A stage as the task layer sees it: the table it writes, the tables it reads, the code it runs, and the
    ExecutionConfig fields its result depends on (training: the process count sets the global batch)."""

    table: str
    inputs: tuple[str, ...]
    code: tuple[Any, ...]
    execution: tuple[str, ...] = ()

    def key(self, ctx: StageContext, cfg, parameters: dict) -> str:
        return stage_key(self.table, code_version(*self.code), ctx, cfg,
                         {name: parameters.get(name) for name in self.inputs}, self.execution)


# ---------------------------------------------------------------- running a stage


def read_ref(ref: dict) -> pa.Table:
    return store.read_table(Path(ref["path"]), SCHEMAS[ref["table"]], name=ref["table"])


def with_oom_backoff(run: Callable[[Any], pa.Table], cfg, log=print) -> pa.Table:
    """Run; on a CUDA out-of-memory error halve cfg.batch_size and go on (down to 1), instead of failing the round.

    A training config keeps its pairs per optimizer step: the micro-batch drops to the largest divisor of it that
    is at most half, and gradient accumulation grows by the same factor (8 x 4 -> 4 x 8; 6 x 4 -> 3 x 8).
    """
    import torch

    while True:
        try:
            return run(cfg)
        except torch.cuda.OutOfMemoryError:
            size = getattr(cfg, "batch_size", 1)
            if size <= 1:
                raise
            torch.cuda.empty_cache()
            if hasattr(cfg, "gradient_accumulation_steps"):
                smaller = next(d for d in range(size // 2, 0, -1) if size % d == 0)
                update = {"batch_size": smaller,
                          "gradient_accumulation_steps": cfg.gradient_accumulation_steps * (size // smaller)}
            else:
                update = {"batch_size": size // 2}
            cfg = cfg.model_copy(update=update)
            log("CUDA out of memory: retrying with " + ", ".join(f"{k}={v}" for k, v in update.items()))


ShardMap = Callable[[list[tuple[int, Any]]], Iterator[tuple[int, pa.Table]]]


@contextlib.contextmanager
def shard_map(ctx: StageContext, stage: str, cfg, compute: Callable, log=print) -> Iterator[ShardMap]:
    """A function that computes `compute(cfg, rows)` for each (shard, rows) and yields (shard, table) as each is done.

    local: in order, in this process, with the OOM back-off. ray: on model replicas of a Ray cluster, in completion
    order (tasks/scaleout.py; Ray is imported only here, so the base install never needs it).
    """
    if ctx.execution.execution == "ray":
        try:
            from tasks.scaleout import ray_shard_map
        except ImportError as error:
            raise RuntimeError(
                f"execution: ray needs Ray and prefect-ray, which are not installed ({error}); install the extra with "
                "`pip install 'ospo[ray]'` (or `pip install -e '.[ray]'` in a checkout), or set execution: local"
            ) from error
        with ray_shard_map(ctx, stage, cfg, compute, log) as run:
            yield run
    else:
        yield lambda parts: ((shard, with_oom_backoff(lambda c: compute(c, rows), cfg, log)) for shard, rows in parts)


def row_pieces(tables: dict[str, pa.Table], rows: int) -> list[dict[str, pa.Table]]:
    """The inputs cut into pieces of `rows` rows, input by input in order; a piece holds rows of one input and none
    of the others. For a stage whose output rows follow its input rows (input after input), the outputs of the
    pieces, concatenated in order, are the output of the whole."""
    empty = {name: table.slice(0, 0) for name, table in tables.items()}
    pieces = [{**empty, name: table.slice(start, rows)}
              for name, table in tables.items() for start in range(0, table.num_rows, rows)]
    return pieces or [empty]


def run_stage(
    spec: StageSpec,
    ctx: StageContext,
    cfg,
    compute: Callable[[Any, Any], pa.Table],
    refs: dict[str, dict | None],
    *,
    shard_input: str | None = None,
    split: dict[str, pa.Table] | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra_outputs: list[str] = (),
    log=print,
) -> dict:
    """Compute a stage's table and write it atomically; returns its manifest.

    `compute(cfg, rows)` gets the config (its batch size possibly halved after an OOM) and the rows it must process:
    - a sharded stage (`shard_input`): one slice of that table; each slice is one shard file, computed on a model
      replica of the Ray cluster under `execution: ray`. Shards a previous, interrupted run of the same key finished
      are skipped; shards of another key are wiped first.
    - a splittable stage (`split`, its input tables by name): the whole of them here, or under `execution: ray`
      pieces of them (`row_pieces`) spread over the replicas, their outputs concatenated in order: one file either
      way, so the table is the same whichever way it was run.
    - otherwise None.
    `extra_outputs` are files the stage writes besides its table; the cache is only trusted while they are intact.
    """
    key = spec.key(ctx, cfg, refs)
    directory = store.table_dir(ctx.round_path, spec.table)
    directory.mkdir(parents=True, exist_ok=True)
    started = directory / "_key"
    if not started.is_file() or json.loads(started.read_text()) != key:
        for stale in list(directory.glob("part-*.parquet")) + [directory / MARKER]:
            stale.unlink(missing_ok=True)
        store.write_json(started, key)
    if shard_input is not None:
        source = read_ref(refs[shard_input])
        n_shards = max(1, -(-source.num_rows // ctx.shard_rows))
        done = set(store.finished_shards(directory))
        todo = [(shard, source.slice(shard * ctx.shard_rows, ctx.shard_rows))
                for shard in range(n_shards) if shard not in done]
        finished = n_shards - len(todo)
        if progress:
            progress(finished, n_shards)
        if todo:
            with shard_map(ctx, spec.table, cfg, compute, log) as run:
                for shard, table in run(todo):
                    store.write_table(table, directory, shard=shard)
                    finished += 1
                    if progress:
                        progress(finished, n_shards)
        for extra in sorted(set(store.finished_shards(directory)) - set(range(n_shards))):
            store.shard_path(directory, extra).unlink()
    else:
        if split is None:
            table = with_oom_backoff(lambda c: compute(c, None), cfg, log)
        else:
            pieces = row_pieces(split, ctx.shard_rows) if ctx.execution.execution == "ray" else [split]
            with shard_map(ctx, spec.table, cfg, compute, log) as run:
                outputs = dict(run(list(enumerate(pieces))))
            table = pa.concat_tables([outputs[i] for i in range(len(pieces))])
        store.write_table(table, directory, shard=0)
    table = store.read_table(directory, SCHEMAS[spec.table], name=spec.table)
    manifest = {"table": spec.table, "path": str(directory), "rows": table.num_rows,
                "hash": store.content_hash(table), "key": key}
    extra = [str(p) for p in extra_outputs]
    store.write_json(directory / MARKER, {**manifest, "extra": extra, "files": _files_stat(directory, extra)})
    return manifest


def now_id() -> str:
    return time.strftime("round-%Y%m%d-%H%M%S")
