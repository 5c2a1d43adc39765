"""What every stage does the same way: per-row seeds and reading the rows it consumes from an input table."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from ospo_core.records import check_schema

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
