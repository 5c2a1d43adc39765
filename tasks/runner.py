"""One generic runner turns a stage declaration (`ospo_core.pipeline.Stage`) into a Prefect task: the cache key,
atomic (sharded) writes with resume, the OOM back-off, progress and the artifacts.

One cache truth: the stage marker on disk (`_stage.json`, written last). A stage is a cache hit when its marker
holds the stage's key and the sha256 of every file it wrote (shards and extra outputs) still matches; the task then
ends in a "Cached" state without computing. Prefect's own result cache is not used. The key is a hash of the stage
name, its code (its function's module, the modules it declares, the code of the plug-ins it uses), its config, the
content hashes of its input tables, the model fingerprint, the plug-ins chosen and the round.

A sharded stage records the sha256 of each shard as it finishes (`_shards.json`); a rerun keeps the shards whose
bytes still match and recomputes a shard that is missing or was changed (and says so in the run log).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.states import Completed, State

from ospo_core import store
from ospo_core.pipeline import Stage
from ospo_core.records import SCHEMAS
from tasks.context import StageCall, StageContext, round_tools, with_oom_backoff
from tasks.report import PICTURE_INPUTS, Progress, report, stage_started

log = logging.getLogger("ospo.tasks")

MARKER = "_stage.json"  # written last, when every shard of a table is finished
STARTED = "_key"  # the key of the run that is filling the folder
SHARDS = "_shards.json"  # sha256 of each finished shard of that run
_TEMPLATES = Path(__file__).resolve().parent.parent / "ospo_core" / "templates"


# ---------------------------------------------------------------- cache keys


def code_version(*objects: Any) -> str:
    """Hash of the source files that define `objects` (modules, functions, classes) and the template data files."""
    h = hashlib.sha256()
    paths = {Path(inspect.getfile(getattr(o, "func", o))) for o in objects}  # a partial: its function's file
    paths |= set(_TEMPLATES.glob("*.json"))
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: Stage, ctx: StageContext, cfg, refs: dict[str, dict | None]) -> str:
    tools = round_tools(ctx, cfg)
    plugins = {name: getattr(tools, name) for name in stage.uses}
    code = [stage.function, *stage.code, *(type(p) for p in plugins.values())]
    code += [module for p in plugins.values() for module in p.code]
    document = {
        "stage": stage.name,
        "code": code_version(*code),
        "plugins": {name: p.name for name, p in plugins.items()},
        # weights a plug-in judges with besides the stage's model (a fixed judge's start model, a detector folder)
        "plugin_weights": {name: getattr(p, "identity", "") for name, p in plugins.items()},
        "round": [ctx.home, ctx.round_id],
        "model": ctx.fingerprint,
        "shard_rows": ctx.shard_rows,
        "config": cfg.model_dump(mode="json") if cfg is not None else None,
        "inputs": {name: (refs.get(name) or {}).get("hash") for name in sorted(stage.reads)},
    }
    if stage.execution:
        document["execution"] = {name: getattr(ctx.execution, name) for name in stage.execution}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def file_hash(path: Path) -> str | None:
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _files(directory: Path, extra: list[str]) -> dict[str, str | None]:
    """sha256 of a table's shards and of its extra output files (e.g. the adapter of training)."""
    paths = sorted(directory.glob("part-*.parquet")) + [Path(p) for p in extra]
    return {str(p): file_hash(p) for p in paths}


def intact(directory: Path, key: str) -> dict | None:
    """The manifest of a finished table whose marker holds `key` and whose files are byte for byte as written."""
    marker = _read_json(directory / MARKER)
    if not isinstance(marker, dict) or marker.get("key") != key:
        return None
    if marker.get("files") != _files(directory, marker.get("extra", [])):
        log.warning("%s: files changed since the stage finished; recomputing what changed", directory.name)
        return None
    return {k: marker[k] for k in ("table", "path", "rows", "hash", "key")}


# ---------------------------------------------------------------- running a stage


_SCHEMAS = dict(SCHEMAS)  # and those of stages declared elsewhere (StageTask registers them)


def read_ref(ref: dict) -> pa.Table:
    return store.read_table(Path(ref["path"]), _SCHEMAS[ref["table"]], name=ref["table"])


def _input(ref: dict | None):
    """An input table, or a reference that is not a table (a prompt set) as it is, or None (no masks)."""
    if ref is None or "path" not in ref:
        return ref
    return read_ref(ref)


@contextlib.contextmanager
def shard_map(ctx: StageContext, stage: Stage, cfg, call: StageCall) -> Iterator[Callable]:
    """A function that computes `call(cfg, tables)` for each (part, tables) and yields (part, table) as each is done.

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
        with ray_shard_map(ctx, stage.name, cfg, call) as run:
            yield run
    else:
        def run(parts):
            for part, tables in parts:
                yield part, with_oom_backoff(call, cfg, tables)

        yield run


def row_pieces(tables: dict[str, pa.Table], rows: int) -> list[dict[str, pa.Table]]:
    """The inputs cut into pieces of `rows` rows, input by input in order; a piece holds rows of one input and none
    of the others. For a stage whose output rows follow its input rows (input after input), the outputs of the
    pieces, concatenated in order, are the output of the whole."""
    empty = {name: table.slice(0, 0) for name, table in tables.items()}
    pieces = [{**empty, name: table.slice(start, rows)}
              for name, table in tables.items() for start in range(0, table.num_rows, rows)]
    return pieces or [empty]


def _resume(directory: Path, key: str) -> dict[int, str]:
    """Start or resume filling `directory` for `key`: {shard: sha256} of the shards a previous run of the same key
    finished and that are intact; everything else in the folder is removed."""
    started = _read_json(directory / STARTED)
    recorded = _read_json(directory / SHARDS) if started == key else None
    recorded = {int(k): v for k, v in recorded.items()} if isinstance(recorded, dict) else {}
    kept = {}
    for shard in store.finished_shards(directory):
        path = store.shard_path(directory, shard)
        digest = file_hash(path) if started == key else None  # another key's shards go unread
        if started == key and recorded.get(shard) in (None, digest):
            # recorded and intact, or written (atomically) by this key's run just before it died, unrecorded
            kept[shard] = digest
        else:
            if shard in recorded:
                log.warning("%s: %s changed since it was written; recomputing it", directory.name, path.name)
            path.unlink()
    (directory / MARKER).unlink(missing_ok=True)
    if started != key:
        store.write_json(directory / STARTED, key)
    store.write_json(directory / SHARDS, {str(k): v for k, v in kept.items()})
    return kept


def run_stage(stage: Stage, ctx: StageContext, cfg, refs: dict[str, dict | None], *,
              progress: Callable[[int, int], None] | None = None) -> tuple[dict, bool]:
    """(manifest, cached): the stage's table, computed and written atomically unless its marker is intact.

    The function gets its inputs by name:
    - a sharded stage (`stage.shard`): one slice of that input per shard file, the other inputs whole; shards a
      previous, interrupted run of the same key finished are kept; under `execution: ray` model replicas of the
      Ray cluster compute the shards.
    - a split stage: the whole inputs here, or under `execution: ray` pieces of them (`row_pieces`) spread over the
      replicas, their outputs concatenated in order: one file either way.
    - otherwise everything, in this process.
    """
    key = stage_key(stage, ctx, cfg, refs)
    directory = store.table_dir(ctx.round_path, stage.name)
    cached = intact(directory, key)
    if cached is not None:
        return cached, True
    directory.mkdir(parents=True, exist_ok=True)
    done = _resume(directory, key)
    inputs = {name: _input(refs.get(name)) for name in stage.reads}
    if stage.shard is not None:
        source = inputs[stage.shard]
        n_shards = max(1, -(-source.num_rows // ctx.shard_rows))
        todo = [(shard, {**inputs, stage.shard: source.slice(shard * ctx.shard_rows, ctx.shard_rows)})
                for shard in range(n_shards) if shard not in done]
        for extra in sorted(set(done) - set(range(n_shards))):
            store.shard_path(directory, extra).unlink()
            done.pop(extra)
        if progress:
            progress(len(done), n_shards)
        if todo:
            with shard_map(ctx, stage, cfg, StageCall(stage, ctx)) as run:
                for shard, table in run(todo):
                    done[shard] = file_hash(store.write_table(table, directory, shard=shard))
                    store.write_json(directory / SHARDS, {str(k): v for k, v in done.items()})
                    if progress:
                        progress(len(done), n_shards)
    elif stage.split:
        call = StageCall(stage, ctx, whole=inputs)
        pieces = row_pieces(inputs, ctx.shard_rows) if ctx.execution.execution == "ray" else [inputs]
        with shard_map(ctx, stage, cfg, call) as run:
            outputs = dict(run(list(enumerate(pieces))))
        store.write_table(pa.concat_tables([outputs[i] for i in range(len(pieces))]), directory, shard=0)
    else:
        call = StageCall(stage, ctx, tool_fields={
            "workdir": ctx.round_path, "key": key, "progress": progress,
            "table_paths": {name: Path(ref["path"]) for name, ref in refs.items() if ref and "path" in ref}})
        store.write_table(with_oom_backoff(call, cfg, inputs), directory, shard=0)
    table = store.read_table(directory, stage.schema or SCHEMAS[stage.name], name=stage.name)
    manifest = {"table": stage.name, "path": str(directory), "rows": table.num_rows,
                "hash": store.content_hash(table), "key": key}
    extra = [str(ctx.round_path / p) for p in stage.outputs]
    store.write_json(directory / MARKER, {**manifest, "extra": extra, "files": _files(directory, extra)})
    return manifest, False


# ---------------------------------------------------------------- stages as Prefect tasks


def _transient(task, task_run, state) -> bool:
    """Retry connection and timeout errors (e.g. a network filesystem hiccup), never bad data or bad config."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):
        return True
    except BaseException:
        return False
    return False


_GPU_LIMITS: dict[str, bool] = {}  # API URL -> whether its `gpu` concurrency limit exists (asked once per process)


def gpu_slot():
    """The `gpu` concurrency slot where the server has that limit (`ospo serve` creates it), so that two rounds on
    one machine take turns on the accelerator; nothing where it has none (an in-process `ospo run`, whose temporary
    server runs one round), instead of Prefect's warning in every stage."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value() or ""
    if api not in _GPU_LIMITS:
        try:
            with get_client(sync_client=True) as client:
                client.read_global_concurrency_limit_by_name("gpu")
            _GPU_LIMITS[api] = True
        except ObjectNotFound:
            _GPU_LIMITS[api] = False
            log.info("no `gpu` concurrency limit on this Prefect server: stages do not take turns on the accelerator "
                     "(`ospo serve` creates it; by hand: prefect gcl create gpu --limit 1)")
    return concurrency("gpu", strict=False) if _GPU_LIMITS[api] else contextlib.nullcontext()


class StageTask:
    """A stage declaration as a Prefect task, called with its inputs by name: `perturb(ctx, cfg, prompts=ref)`.

    Model stages take the `gpu` concurrency slot (`gpu_slot`) so that two rounds on one machine take turns.
    """

    def __init__(self, stage: Stage):
        self.stage = stage
        if stage.schema is not None:
            _SCHEMAS[stage.name] = stage.schema
        self.task = task(name=stage.task, cache_policy=NO_CACHE, persist_result=False, retries=2,
                         retry_delay_seconds=5, retry_condition_fn=_transient)(self._run)

    def _run(self, ctx: StageContext, cfg, inputs: dict[str, dict | None]) -> dict | State:
        stage = self.stage
        started = time.monotonic()
        progress = Progress(ctx, stage.name, stage.progress) if stage.progress else None
        with gpu_slot(), progress.from_logs() if progress else contextlib.nullcontext():
            manifest, cached = run_stage(stage, ctx, cfg, inputs, progress=progress)
        if cached:
            log.info("%s: cache hit (marker intact), %d rows", stage.name, manifest["rows"])
            return Completed(data=manifest, name="Cached", message="the stage marker and its files are intact")
        rows_in = sum((ref or {}).get("rows") or 0 for ref in inputs.values()) if inputs else None
        pictured = {name: read_ref(inputs[name]) for name in PICTURE_INPUTS.get(stage.name, ()) if inputs.get(name)}
        report(ctx, stage.name, manifest, read_ref(manifest), rows_in, time.monotonic() - started, pictured)
        return manifest

    def __call__(self, ctx: StageContext, cfg, **inputs: dict | None) -> dict:
        unknown = set(inputs) - set(self.stage.reads)
        if unknown:
            raise TypeError(f"stage {self.stage.name} reads {self.stage.reads}, not {sorted(unknown)}")
        stage_started(self.stage.name)  # the flow run's "stage k of N"
        result = self.task(ctx, cfg, {name: inputs.get(name) for name in self.stage.reads})
        return result.result() if isinstance(result, State) else result


def now_id() -> str:
    return time.strftime("round-%Y%m%d-%H%M%S")
