"""Where a round's artifacts live and how they are written: run folders, atomic sharded Parquet, content hashes,
round manifests and the model registry.

Layout under OSPO_HOME (default `./.ospo`):

    runs/<round_id>/manifest.json          round config, model lineage, row counts and hashes of every table
    runs/<round_id>/<table>/part-00000.parquet, part-00001.parquet, ...
    models/registry.json                   every round's adapter, its parent, metrics, whether it was promoted
    models/registry.json.bak               its copy; each entry is also kept in its round's manifest

Every file is written to a temporary name in its final folder, fsynced, then renamed (`os.replace`), so a reader
never sees a half-written file and a crash leaves at most a temporary file that readers ignore and the next write
replaces. A shard that exists under its final name is finished: a rerun skips it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from ospo_core.records import IMAGE_STRUCT, SCHEMAS, check_schema

_ROUND_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHARD = re.compile(r"part-(\d{5})\.parquet")
_MAX_SHARD = 99_999  # five digits in the file name

log = logging.getLogger("ospo.store")


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


_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def table_dir(round_path: Path, table: str) -> Path:
    """The folder that holds the shards of a table (those of `records.SCHEMAS`, or a stage's own)."""
    if not _TABLE_NAME.fullmatch(table):
        raise ValueError(f"table name {table!r} is not a plain lowercase name; known tables: {sorted(SCHEMAS)}")
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


class CorruptFileError(ValueError):
    """A JSON document of the store (a manifest, a registry file) is damaged; the message names it and the fix."""


def write_json(path: Path, document: Any) -> Path:
    """Atomic JSON file (temporary sibling + rename)."""
    data = json.dumps(document, indent=2, allow_nan=False).encode() + b"\n"
    return _atomic_write(path, lambda f: f.write(data))


def _read_json(path: Path, what: str, fix: str | None = None) -> Any:
    then = f"; {fix}" if fix else ""
    # A fifo or a device under the name would block the read forever: only regular files are opened.
    if not path.is_file():
        raise CorruptFileError(f"{what} {path} is not a regular file (a folder, device, fifo or broken link){then}")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{what} {path} is not valid JSON ({e}){then}") from e


def write_manifest(round_path: Path, manifest: dict) -> Path:
    """Write `<round_dir>/manifest.json` atomically (it must be JSON: no NaN, no objects)."""
    return write_json(Path(round_path) / "manifest.json", manifest)


def read_manifest(round_path: Path) -> dict:
    """The round's manifest; a missing one is FileNotFoundError, a damaged one CorruptFileError (one line)."""
    path = Path(round_path) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: the round has not written one yet")
    fix = f"restore it, or delete the round folder {path.parent} if the round is not needed"
    manifest = _read_json(path, "round manifest", fix)
    if not isinstance(manifest, dict):
        raise CorruptFileError(f"round manifest {path} holds a {type(manifest).__name__}, not a JSON object; {fix}")
    return manifest


# ---------------------------------------------------------------- locks


class RoundBusyError(RuntimeError):
    """Another process is running the same round."""


_HELD_ROUNDS: dict[str, IO] = {}


def lock_round(round_path: Path) -> None:
    """Hold an exclusive lock on a round folder until `unlock_round` or the end of this process.

    Two processes running the same round id would write the same shards; the second is refused at once. The lock
    is released by the kernel when the holder dies, so a crashed round can be resumed right away. (A raw `flock`
    rather than `filelock`: the refusal names the holder, whose pid is written into the lock file itself.)
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


# ---------------------------------------------------------------- model registry
#
# `models/registry.json` is an index of the round manifests: `register` records each entry in the round's own
# manifest (key `registry_entry`) before it writes the registry, and then writes the registry twice, as
# `registry.json` and its copy `registry.json.bak`, each atomically. Deleting or damaging one file loses nothing
# (readers fall back to the other and say so); losing both is repaired by `rebuild_registry`. A registry that cannot
# be read stops the caller: the next round must never quietly start from the base model.


class RegistryError(ValueError):
    """The model registry cannot be read; the message names the file and the command that rebuilds it. (A
    ValueError, as a damaged registry always was, so existing handlers keep catching it.)"""


REBUILD_HINT = "run `ospo rounds --rebuild` to rebuild it from the round manifests"


def _registry_path(home: Path) -> Path:
    return Path(home) / "models" / "registry.json"


def _backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def _registry_lock(path: Path) -> FileLock:
    """Serialises read-modify-write of the registry across processes (a sibling `registry.json.lock`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(path.name + ".lock"))


def _read_registry_file(path: Path) -> list[dict]:
    document = _read_json(path, "model registry")
    entries = document.get("entries") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("round_id"), str) and isinstance(e.get("promoted"), bool)
        for e in entries
    ):
        raise CorruptFileError(
            f"model registry {path} is not a registry (expected {{\"entries\": [...]}}, each entry with a round_id "
            f"and promoted)"
        )
    return entries


def _finished_manifests(home: Path) -> list[dict]:
    """Manifests of the closed rounds under `<home>/runs`, oldest first (by finish time, then round id).

    Folders without a manifest (a testbed run, a round that never started) are not rounds; a damaged manifest
    stops the caller with CorruptFileError, since it may hold the only record of a promoted model."""
    runs = Path(home) / "runs"
    manifests = []
    for folder in sorted(runs.iterdir()) if runs.is_dir() else []:
        if (folder / "manifest.json").exists() and _ROUND_ID.fullmatch(folder.name):
            manifest = read_manifest(folder)
            if manifest.get("status") == "finished":
                manifests.append({**manifest, "round_id": folder.name})
    return sorted(manifests, key=lambda m: (str(m.get("finished", "")), m["round_id"]))


def list_entries(home: Path) -> list[dict]:
    """Registry entries in registration order.

    Empty on a fresh OSPO_HOME. A missing or damaged `registry.json` falls back to `registry.json.bak` with a
    warning; RegistryError when neither can be read, or when both are missing but finished rounds exist."""
    return _entries(home)


def _entries(home: Path, registering: str | None = None) -> list[dict]:
    """`list_entries`; `registering` is the round being registered now, whose own finished manifest does not mean
    that a registry was lost."""
    path = _registry_path(home)
    backup = _backup_path(path)
    problems = []
    for candidate in (path, backup):
        if not (candidate.exists() or candidate.is_symlink()):
            problems.append(f"{candidate} is missing")
            continue
        try:
            entries = _read_registry_file(candidate)
        except CorruptFileError as e:
            problems.append(str(e))
            continue
        if candidate is backup:
            log.warning("model registry %s could not be read (%s); using its copy %s. %s", path, problems[0],
                        backup, REBUILD_HINT[0].upper() + REBUILD_HINT[1:])
        return entries
    damaged = [p for p in problems if not p.endswith("is missing")]
    if damaged:
        raise RegistryError(f"cannot read the model registry: {'; '.join(damaged)}; {REBUILD_HINT}")
    finished = [m for m in _finished_manifests(home) if m["round_id"] != registering]
    if finished:
        raise RegistryError(
            f"model registry {path} is missing, but {len(finished)} finished round(s) exist under "
            f"{Path(home) / 'runs'}; {REBUILD_HINT} (otherwise the next round would start from the base model)"
        )
    return []


def _write_registry(path: Path, entries: list[dict]) -> None:
    # The main file first: a crash between the two writes leaves the newest state under the name read first.
    document = {"entries": entries}
    write_json(path, document)
    write_json(_backup_path(path), document)


def _record_in_manifest(home: Path, entry: dict) -> None:
    """Keep the entry (its promotion decision included) in the round's manifest, the source `rebuild_registry`
    reads. Rounds registered without a round folder (the registry alone) have nothing to record into."""
    folder = round_dir(home, entry["round_id"])
    if (folder / "manifest.json").exists():
        write_manifest(folder, {**read_manifest(folder), "registry_entry": entry})


def register(home: Path, entry: dict) -> None:
    """Add a round's model to the registry, or replace the entry with the same `round_id` in place.

    An entry needs `round_id` (a valid round id) and `promoted` (bool); the rest (adapter path, parent model,
    eval metrics, ...) is free-form JSON. Replacing in place keeps the round order, so promoting a round after its
    evaluation does not make it newer than later rounds. The entry is also recorded in the round's manifest.
    """
    check_round_id(entry.get("round_id"))
    if not isinstance(entry.get("promoted"), bool):
        raise ValueError(f"registry entry for {entry['round_id']!r} needs 'promoted': true or false")
    path = _registry_path(home)
    with _registry_lock(path):
        entries = _entries(home, registering=entry["round_id"])
        _record_in_manifest(home, entry)
        same = [i for i, e in enumerate(entries) if e["round_id"] == entry["round_id"]]
        if same:
            entries[same[0]] = entry
        else:
            entries.append(entry)
        _write_registry(path, entries)


_UNRECORDED = "rebuilt from the round manifest, which does not record a promotion decision: not promoted"


def _entry_from_manifest(manifest: dict) -> dict:
    """The registry entry a closed round's manifest records, or, for a manifest written before entries were
    recorded, one rebuilt from its lineage fields and marked not promoted (its decision is unknown)."""
    if isinstance(manifest.get("registry_entry"), dict):
        return {**manifest["registry_entry"], "round_id": manifest["round_id"]}
    model = manifest.get("model", {})
    return {
        "round_id": manifest["round_id"],
        "model": model.get("source"),
        "adapters": model.get("adapters", []),
        "adapter": manifest.get("adapter"),
        "trained_from": model.get("fingerprint"),
        "fingerprint": manifest.get("fingerprint_after"),
        "metrics": {"training": manifest.get("training", {})},
        "promoted": False,
        "decision": _UNRECORDED,
        "created": manifest.get("finished"),
    }


def rebuild_registry(home: Path) -> list[dict]:
    """Rewrite `models/registry.json` (and its copy) from the manifests of the finished rounds under `runs/`.

    Entries come back as registered, promotion decisions included, in finishing order. Pruned rounds (their folders
    are gone) are not restored: they are history only, since a promoted lineage is never pruned. A registry file
    that cannot be read is kept aside as `registry.json.corrupt` for inspection. Returns the new entries.
    """
    path = _registry_path(home)
    with _registry_lock(path):
        entries = [_entry_from_manifest(m) for m in _finished_manifests(home)]
        if path.exists() or path.is_symlink():
            try:
                _read_registry_file(path)
            except CorruptFileError:
                os.replace(path, path.with_name(path.name + ".corrupt"))
        _write_registry(path, entries)
    unknown = [e["round_id"] for e in entries if e.get("decision") == _UNRECORDED]
    log.info("rebuilt model registry %s from %d round manifest(s)", path, len(entries))
    if unknown:
        log.warning("rounds %s recorded no promotion decision and were registered as not promoted; promote them "
                    "again with the evaluation gate if they should be a start model", ", ".join(unknown))
    return entries


def latest_promoted(home: Path) -> dict | None:
    """The most recently registered promoted entry: the model the next round starts from (None: the base model).

    RegistryError (never None) when the registry is lost or damaged while finished rounds exist."""
    promoted = [e for e in list_entries(home) if e["promoted"]]
    return promoted[-1] if promoted else None


def prune_rounds(home: Path, keep_last: int) -> list[str]:
    """Delete the folders of old finished rounds, keeping the newest `keep_last` registered rounds, every round in
    the lineage of a promoted model (its adapter is merged into every later start model) and any round a process
    (this one included) is running now.

    Safe to call after every round: only registered (closed) rounds are pruned, in registration order, so a crashed
    round stays resumable and testbed runs stay; the registry lock is held throughout, so a promotion
    decided meanwhile waits and is seen. Call it after the round's promotion gate (or keep_last >= 1), since a round
    closed but not yet judged is not promoted yet. Registry entries stay, marked `pruned`, so the history of
    decisions survives. Returns the pruned round ids, oldest first.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    home = Path(home)
    path = _registry_path(home)
    with _registry_lock(path):
        entries = list_entries(home)
        lineage = {
            str(Path(a).resolve())
            for e in entries if e["promoted"]
            for a in [*e.get("adapters", []), e.get("adapter") or ""] if a
        }
        candidates = [e["round_id"] for e in entries if round_dir(home, e["round_id"]).is_dir() and not e.get("pruned")]
        pruned = []
        for round_id in candidates[: max(len(candidates) - keep_last, 0)]:
            folder = round_dir(home, round_id).resolve()
            if str(folder) in _HELD_ROUNDS or any(a.startswith(str(folder) + os.sep) for a in lineage):
                continue
            try:
                lock_round(folder)  # refuses a round that is running in another process
            except RoundBusyError:
                continue
            try:  # deleted while locked, so no process can start it meanwhile
                shutil.rmtree(folder)
            finally:
                unlock_round(folder)
            pruned.append(round_id)
        if pruned:
            for entry in entries:
                if entry["round_id"] in pruned:
                    entry["pruned"] = True
            _write_registry(path, entries)
    if pruned:
        log.info("pruned %d old round folder(s): %s", len(pruned), ", ".join(pruned))
    return pruned
