"""Where a round's artifacts live and how they are written: run folders, atomic sharded Parquet, content hashes,
round manifests and the model registry.

Layout under OSPO_HOME (default `./.ospo`):

    runs/<round_id>/manifest.json          round config, model lineage, row counts and hashes of every table
    runs/<round_id>/<table>/part-00000.parquet, part-00001.parquet, ...
    models/registry.json                   every round's adapter, its parent, metrics, whether it was promoted

Every file is written to a temporary name in its final folder, fsynced, then renamed (`os.replace`), so a reader
never sees a half-written file and a crash leaves at most a temporary file that readers ignore and the next write
replaces. A shard that exists under its final name is finished: a rerun skips it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ospo_core.records import IMAGE_STRUCT, SCHEMAS, check_schema

_ROUND_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHARD = re.compile(r"part-(\d{5})\.parquet")
_MAX_SHARD = 99_999  # five digits in the file name


class CorruptShardError(RuntimeError):
    """A finished shard cannot be read as Parquet."""


# ---------------------------------------------------------------- folders


def ospo_home() -> Path:
    """The artifact root: $OSPO_HOME, or `./.ospo` when it is unset (absolute, resolved against the cwd)."""
    return Path(os.environ.get("OSPO_HOME") or ".ospo").expanduser().resolve()


def check_round_id(round_id: str) -> str:
    """A round id is one plain folder name, so no config can make a stage write outside OSPO_HOME."""
    if not isinstance(round_id, str) or not _ROUND_ID.fullmatch(round_id) or ".." in round_id:
        raise ValueError(
            f"invalid round id {round_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit, without '..' or path separators (e.g. 'round-003')"
        )
    return round_id


def round_dir(home: Path, round_id: str) -> Path:
    """`<home>/runs/<round_id>/` (not created)."""
    return Path(home) / "runs" / check_round_id(round_id)


def table_dir(round_path: Path, table: str) -> Path:
    """The folder that holds the shards of one of the tables in `records.SCHEMAS`."""
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; known tables: {sorted(SCHEMAS)}")
    return Path(round_path) / table


# ---------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the folder entry itself is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` through a temporary sibling (dot-prefixed, so shard globs never match it) and rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


# ---------------------------------------------------------------- sharded Parquet


def _hf_features_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """Schema metadata that makes `datasets.load_dataset("parquet", ...)` decode IMAGE_STRUCT columns as images.

    datasets reads its `Features` from the `huggingface` key of the Arrow schema metadata
    (`Features.from_arrow_schema`); a struct column without it stays a plain dict of bytes.
    """
    image_columns = [f.name for f in schema if f.type == IMAGE_STRUCT]
    if not image_columns:
        return {}
    import datasets  # heavy import (about a second); only tables with images need it

    features = datasets.Features.from_arrow_schema(schema.remove_metadata())
    for name in image_columns:
        features[name] = datasets.Image()
    return {b"huggingface": features.arrow_schema.metadata[b"huggingface"]}


def shard_path(directory: Path, shard: int) -> Path:
    if not 0 <= shard <= _MAX_SHARD:
        raise ValueError(f"shard must be in [0, {_MAX_SHARD}], got {shard}")
    return Path(directory) / f"part-{shard:05d}.parquet"


def write_table(table: pa.Table, directory: Path, *, shard: int = 0) -> Path:
    """Write `table` as `<directory>/part-{shard:05d}.parquet`, atomically; returns the final path.

    Tables with image columns also get the datasets features metadata, so they open as `datasets.Image`.
    """
    path = shard_path(directory, shard)
    metadata = {**(table.schema.metadata or {}), **_hf_features_metadata(table.schema)}
    table = table.replace_schema_metadata(metadata or None)
    return _atomic_write(path, lambda f: pq.write_table(table, f))


def finished_shards(directory: Path) -> list[int]:
    """Indices of the shards written completely (temporary files are not shards)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SHARD.fullmatch(p.name)))


def _shard_files(directory: Path) -> list[Path]:
    return [shard_path(directory, i) for i in finished_shards(directory)]


def _open_shard(path: Path, table: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorruptShardError(
            f"shard {path} of table '{table}' is not a readable Parquet file ({e}); it was cut short or damaged "
            f"outside the atomic writer. Delete that file and rerun the stage that writes '{table}'."
        ) from e


def read_table(directory: Path, schema: pa.Schema, *, name: str | None = None) -> pa.Table:
    """All finished shards of a table, in shard order, checked against `schema` and returned with exactly it.

    `name` (default: the folder name) is the table name used in error messages.
    """
    directory = Path(directory)
    name = name or directory.name
    files = _shard_files(directory)
    if not files:
        raise FileNotFoundError(f"table '{name}' has no finished shards in {directory}; run the stage that writes it")
    parts = []
    for path in files:
        with _open_shard(path, name) as shard:
            check_schema(shard.schema_arrow, schema, table=name, where=str(path))
            try:
                part = shard.read()
            except (pa.ArrowException, OSError) as e:
                raise CorruptShardError(
                    f"shard {path} of table '{name}' could not be read ({e}). Delete that file and rerun the stage "
                    f"that writes '{name}'."
                ) from e
        parts.append(part.select(schema.names))
    table = pa.concat_tables(parts)
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ValueError(f"table '{name}' in {directory}: column '{field.name}' must not contain nulls")
    return pa.Table.from_arrays(table.columns, schema=schema)


# ---------------------------------------------------------------- content hashes


def _encode(value: Any, out: list[bytes]) -> None:
    """A type-tagged, length-prefixed encoding, so different values never encode alike."""
    if value is None:
        out.append(b"N")
    elif isinstance(value, bool):
        out.append(b"T" if value else b"F")
    elif isinstance(value, int):
        digits = str(value).encode()
        out += [b"i", struct.pack("<I", len(digits)), digits]
    elif isinstance(value, float):
        out += [b"f", struct.pack("<d", value)]
    elif isinstance(value, str):
        data = value.encode()
        out += [b"s", struct.pack("<Q", len(data)), data]
    elif isinstance(value, bytes):
        out += [b"b", struct.pack("<Q", len(value)), value]
    elif isinstance(value, (list, tuple)):
        out += [b"l", struct.pack("<Q", len(value))]
        for v in value:
            _encode(v, out)
    elif isinstance(value, dict):  # a struct, its fields in schema order
        out += [b"d", struct.pack("<Q", len(value))]
        for v in value.values():
            _encode(v, out)
    else:
        raise TypeError(f"content_hash does not support values of type {type(value).__name__}")


def _batches(source: Path | pa.Table) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    if isinstance(source, pa.Table):
        yield source.schema, iter(source.to_batches())
        return
    directory = Path(source)
    files = _shard_files(directory)
    if not files:
        raise FileNotFoundError(f"no finished shards in {directory} to hash")
    for path in files:
        with _open_shard(path, directory.name) as shard:
            yield shard.schema_arrow, shard.iter_batches()


def content_hash(source: Path | pa.Table) -> str:
    """sha256 (hex) of a table's logical content: column names and types, then every row in order.

    Only values count, not bytes on disk: the same rows hash the same whether they sit in one table, in a different
    number of shards or batches, or in files written with other Parquet settings or schema metadata (such as the
    datasets features). Nullability is not part of the hash. A folder hashes its finished shards in shard order.
    """
    digest = sha256()
    header = None
    for schema, batches in _batches(source):
        fields = "\n".join(f"{f.name}:{f.type}" for f in schema).encode()
        if header is None:
            header = fields
            digest.update(struct.pack("<Q", len(fields)) + fields)
        elif fields != header:
            raise ValueError(f"shards of {source} have different schemas; rewrite the table")
        for batch in batches:
            for row in batch.to_pylist():
                out: list[bytes] = []
                _encode(row, out)
                digest.update(b"".join(out))
    return digest.hexdigest()


# ---------------------------------------------------------------- JSON documents


def write_json(path: Path, document: Any) -> Path:
    """Atomic JSON file (temporary sibling + rename)."""
    data = json.dumps(document, indent=2, allow_nan=False).encode() + b"\n"
    return _atomic_write(path, lambda f: f.write(data))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); restore or delete it") from e


def write_manifest(round_path: Path, manifest: dict) -> Path:
    """Write `<round_dir>/manifest.json` atomically (it must be JSON: no NaN, no objects)."""
    return write_json(Path(round_path) / "manifest.json", manifest)


def read_manifest(round_path: Path) -> dict:
    path = Path(round_path) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: the round has not written one yet")
    return _read_json(path, "manifest")


# ---------------------------------------------------------------- model registry


def _registry_path(home: Path) -> Path:
    return Path(home) / "models" / "registry.json"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on a sibling lock file, so read-modify-write of `path` is serialised across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class RoundBusyError(RuntimeError):
    """Another process is running the same round."""


_HELD_ROUNDS: dict[str, IO] = {}


def lock_round(round_path: Path) -> None:
    """Hold an exclusive lock on a round folder until `unlock_round` or the end of this process.

    Two processes running the same round id would write the same shards; the second is refused at once. The lock
    is released by the kernel when the holder dies, so a crashed round can be resumed right away.
    """
    round_path = Path(round_path)
    key = str(round_path.resolve())
    if key in _HELD_ROUNDS:
        return
    round_path.mkdir(parents=True, exist_ok=True)
    handle = open(round_path / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RoundBusyError(
            f"round {round_path.name} is being run by {holder}; wait for it to finish or pick another round id"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _HELD_ROUNDS[key] = handle


def unlock_round(round_path: Path) -> None:
    handle = _HELD_ROUNDS.pop(str(Path(round_path).resolve()), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def list_entries(home: Path) -> list[dict]:
    """Registry entries in registration order (empty when nothing was registered)."""
    path = _registry_path(home)
    if not path.exists():
        return []
    return _read_json(path, "model registry")["entries"]


def register(home: Path, entry: dict) -> None:
    """Add a round's model to the registry, or replace the entry with the same `round_id` in place.

    An entry needs `round_id` (a valid round id) and `promoted` (bool); the rest (adapter path, parent model,
    eval metrics, ...) is free-form JSON. Replacing in place keeps the round order, so promoting a round after its
    evaluation does not make it newer than later rounds.
    """
    check_round_id(entry.get("round_id"))
    if not isinstance(entry.get("promoted"), bool):
        raise ValueError(f"registry entry for {entry['round_id']!r} needs 'promoted': true or false")
    path = _registry_path(home)
    with _locked(path):
        entries = list_entries(home)
        same = [i for i, e in enumerate(entries) if e["round_id"] == entry["round_id"]]
        if same:
            entries[same[0]] = entry
        else:
            entries.append(entry)
        write_json(path, {"entries": entries})


def latest_promoted(home: Path) -> dict | None:
    """The most recently registered promoted entry: the model the next round starts from (None: the base model)."""
    promoted = [e for e in list_entries(home) if e["promoted"]]
    return promoted[-1] if promoted else None


def prune_rounds(home: Path, keep_last: int) -> list[str]:
    """Delete the folders of old rounds, keeping the newest `keep_last`, every round in the lineage of a promoted
    model (its adapter is merged into every later start model) and any round a process is running now.

    Registry entries stay (marked `pruned`), so the history of decisions survives. Returns the pruned round ids.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    home = Path(home)
    entries = list_entries(home)
    needed = set()
    for entry in entries:
        if entry["promoted"]:
            needed |= {str(Path(a).resolve()) for a in [*entry.get("adapters", []), entry.get("adapter") or ""] if a}
    runs = home / "runs"
    folders = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    pruned = []
    for folder in folders[: max(len(folders) - keep_last, 0)]:
        if any(a.startswith(str(folder.resolve()) + os.sep) for a in needed):
            continue
        try:
            lock_round(folder)  # refuses a round that is running in another process
        except RoundBusyError:
            continue
        unlock_round(folder)
        shutil.rmtree(folder)
        pruned.append(folder.name)
    if pruned:
        with _locked(_registry_path(home)):
            entries = list_entries(home)
            for entry in entries:
                if entry["round_id"] in pruned:
                    entry["pruned"] = True
            write_json(_registry_path(home), {"entries": entries})
    return pruned
