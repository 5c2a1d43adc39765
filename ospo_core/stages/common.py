"""What every stage does the same way: per-row seeds and reading the rows it consumes from an input table."""

from __future__ import annotations

import hashlib
import logging

import pyarrow as pa

from ospo_core.janus.text import generate_text
from ospo_core.records import check_schema

log = logging.getLogger("ospo.stages")

# Chats per generate call of a text stage: one log line with the stage's progress after each.
PROGRESS_CHATS = 512
# The columns that identify an item in every stage table after PROMPTS.
ITEM_COLUMNS = ["item_id", "t2i_category", "sub_category"]


def row_seed(*parts: object) -> int:
    """A 63-bit seed from a stable hash of `parts`, e.g. row_seed(cfg.seeds[k], item_id).

    A row's randomness then depends only on its own identity, never on batch composition, sharding or Python's
    per-process string hashing; 63 bits fit the int64 `seed` columns.
    """
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def ok_input_rows(
    table: pa.Table, schema: pa.Schema, columns: list[str], *, table_name: str, stage: str
) -> list[dict]:
    """The ok rows of an input table as dicts, after checking it has `columns` and that no ok row leaves them null.

    Raises ValueError (records.SchemaError) naming the missing column or the null cell and what to do about it.
    """
    check_schema(table.schema, schema, table=table_name, columns=[*columns, "ok"])
    rows = table.filter(table.column("ok")).select(columns).to_pylist()
    for row in rows:
        for name in columns:
            if row[name] is None:
                who = row.get("item_id") or "<no item_id>"
                raise ValueError(
                    f"{stage}: ok row {who} of table '{table_name}' has a null '{name}'; an ok row must carry it. "
                    f"Rerun the stage that writes '{table_name}', or mark that row ok=False"
                )
    return rows


def write_texts(bundle, chats: list, seeds: list[int], cfg, what: str) -> list[str]:
    """The model's answers to `chats` (chat i sampled from seeds[i] with cfg's temperature, top_p, token budget and
    batch size), in one decoding run, with a log line each time another PROGRESS_CHATS answers are written and at the
    end; the line carries the progress (`extra`: the UI's progress artifact reads it)."""
    logged = [0]

    def progress(done: int, total: int) -> None:
        if done // PROGRESS_CHATS > logged[0] // PROGRESS_CHATS or done == total:
            logged[0] = done
            log.info("%s: %d/%d answers written", what, done, total, extra={"progress": (done, total)})

    return generate_text(bundle, chats, seed=seeds, temperature=cfg.temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
