"""One Arrow schema per artifact table, and the small helpers that build rows for them.

Every table carries `ok` and `reason`: a row that a stage rejected stays in the table with `ok=False` and a reason
code (e.g. "no_marker", "duplicate"), so rows in = rows out + rows rejected, per reason, can be read from the table.
Downstream stages read only the `ok` rows of their inputs.
"""

from __future__ import annotations

import pyarrow as pa

# The struct `datasets.Image` uses, so every table opens with `datasets.load_dataset("parquet", ...)`.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TOKENS = pa.list_(pa.int32())

_STATUS = [
    pa.field("ok", pa.bool_(), nullable=False),
    pa.field("reason", pa.string()),  # null when ok
]
# Where a text came from: "model" (parsed model output), "fallback" (built from structured columns) or "testbed"
# (written by the shapes world's grammar, ospo_core.testbed).
_SOURCE = pa.field("source", pa.string())

ATTRIBUTE = pa.struct([("object", pa.string()), ("attribute", pa.string())])
RELATION = pa.struct([("subject", pa.string()), ("predicate", pa.string()), ("object", pa.string())])
COUNT = pa.struct([("object", pa.string()), ("count", pa.int32())])

_ITEM = [
    pa.field("item_id", pa.string()),
    pa.field("t2i_category", pa.string()),
    pa.field("sub_category", pa.string()),
]

PROMPTS = pa.schema(
    _ITEM
    + [
        pa.field("prompt", pa.string()),
        pa.field("concepts", pa.string()),  # the "Concepts and relations" text
        pa.field("relation", pa.string()),  # the raw relation tuple list, e.g. "(bench, blue)"
        pa.field("objects", pa.list_(pa.string())),
        pa.field("attributes", pa.list_(ATTRIBUTE)),
        pa.field("relations", pa.list_(RELATION)),
        pa.field("counts", pa.list_(COUNT)),
        pa.field("raw_output", pa.string()),
        _SOURCE,
    ]
    + _STATUS
)

NEGATIVES = pa.schema(
    _ITEM
    + [
        pa.field("k", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("perturbation", pa.string()),  # replace | swap | drop
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("raw_output", pa.string()),
        _SOURCE,
    ]
    + _STATUS
)

DENSE = pa.schema(
    _ITEM
    + [
        pa.field("k", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("dense_prompt", pa.string()),
        pa.field("negative_dense_prompt", pa.string()),
        pa.field("raw_output", pa.string()),
        _SOURCE,
    ]
    + _STATUS
)

IMAGES = pa.schema(
    _ITEM
    + [
        pa.field("side", pa.string()),  # base | negative
        pa.field("k", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("prompt", pa.string()),  # the (dense) prompt that conditioned the image
        pa.field("image", IMAGE_STRUCT),
        pa.field("image_tokens", TOKENS),
    ]
    + _STATUS
)

QUESTIONS = pa.schema(
    _ITEM
    + [
        pa.field("side", pa.string()),  # base | negative
        pa.field("k", pa.int32()),  # -1 for the base prompt's questions
        pa.field("prompt", pa.string()),  # the short prompt the questions decompose
        pa.field("questions", pa.list_(pa.string())),
        pa.field("raw_output", pa.string()),
        _SOURCE,
    ]
    + _STATUS
)

VQA = pa.schema(
    _ITEM
    + [
        pa.field("side", pa.string()),  # side of the scored image
        pa.field("k", pa.int32()),  # index of the scored image
        pa.field("question_set", pa.string()),  # "base" or "negative_{k}": whose questions were asked
        pa.field("q_index", pa.int32()),
        pa.field("question", pa.string()),
        pa.field("p_yes", pa.float64()),
        pa.field("p_no", pa.float64()),
        pa.field("answer", pa.string()),  # yes | no | tie
    ]
    + _STATUS
)

PAIRS = pa.schema(
    _ITEM
    + [
        pa.field("rule", pa.string()),  # v1 | v2 | v3
        pa.field("prompt", pa.string()),  # short base prompt x_c
        pa.field("rejected_prompt", pa.string()),  # short negative prompt x_r (conditional preference)
        pa.field("chosen_k", pa.int32()),
        pa.field("chosen_side", pa.string()),
        pa.field("rejected_k", pa.int32()),
        pa.field("rejected_side", pa.string()),
        pa.field("rejected_prompt_k", pa.int32()),
        pa.field("chosen", IMAGE_STRUCT),
        pa.field("rejected", IMAGE_STRUCT),
        pa.field("chosen_tokens", TOKENS),
        pa.field("rejected_tokens", TOKENS),
        # The scores that made the choice (null where the rule does not use them).
        pa.field("chosen_score", pa.float64()),
        pa.field("rejected_score", pa.float64()),
        pa.field("image_logp_gap", pa.float64()),  # |l(x_b, y_c) - l(x_b, y_r)|  (v2)
        pa.field("prompt_logp_gap", pa.float64()),  # |l(x_b, y_c) - l(x_r, y_c)|  (v2)
        pa.field("local_gap", pa.float64()),  # v1
        pa.field("global_gap", pa.float64()),  # v1
        pa.field("preference_strength", pa.float64()),  # v1
    ]
    + _STATUS
)

MASKS = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("side", pa.string()),  # chosen | rejected
        pa.field("objects", pa.list_(pa.string())),
        pa.field("grid", pa.int32()),
        pa.field("mask", pa.list_(pa.float32())),  # grid*grid values in [0, 1], raster order
    ]
    + _STATUS
)

# The questions a held-out prompt is judged by: from the benchmark's metadata ("metadata"), or written by the model
# through the questions stage ("model" / "fallback").
EVAL_QUESTIONS = pa.schema(
    [
        pa.field("prompt_set", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("prompt", pa.string()),
        pa.field("questions", pa.list_(pa.string())),
        pa.field("raw_output", pa.string()),
        _SOURCE,
    ]
    + _STATUS
)

EVAL = pa.schema(
    [
        pa.field("prompt_set", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("prompt", pa.string()),
        pa.field("k", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("image", IMAGE_STRUCT),
        pa.field("questions", pa.list_(pa.string())),
        _SOURCE,  # where the questions came from (metadata | model | fallback)
        pa.field("p_yes", pa.list_(pa.float64())),
        pa.field("p_no", pa.list_(pa.float64())),
        pa.field("score", pa.float64()),  # local score = mean(p_yes - p_no)
        pa.field("all_yes", pa.bool_()),
    ]
    + _STATUS
)

TRAIN_HISTORY = pa.schema(
    [
        pa.field("step", pa.int64()),
        pa.field("metric", pa.string()),
        pa.field("value", pa.float64()),
    ]
)

# One scene the model drew for a held-out caption of the shapes-world testbed, checked exactly against the caption
# (ospo_core.testbed.evaluate). Objects are counted per kind: `found` = sum over the caption's groups of
# min(drawn of that kind, asked), so drawn - found objects were not asked for (hallucinated).
TESTBED_EVAL = pa.schema(
    [
        pa.field("category", pa.string()),  # the world's prompt sub-category key (color1, 2D_spatial, ...)
        pa.field("prompt", pa.string()),
        pa.field("k", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("image_tokens", TOKENS),
        pa.field("exact", pa.bool_()),  # the grid is exactly a scene of the caption
        pa.field("asked", pa.int32()),  # objects the caption names
        pa.field("found", pa.int32()),  # of those, drawn
        pa.field("drawn", pa.int32()),  # objects in the grid
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "negatives": NEGATIVES,
    "dense": DENSE,
    "images": IMAGES,
    "questions": QUESTIONS,
    "vqa": VQA,
    "pairs": PAIRS,
    "masks": MASKS,
    "eval_questions": EVAL_QUESTIONS,
    "eval": EVAL,
    "train_history": TRAIN_HISTORY,
    "testbed_eval": TESTBED_EVAL,
}


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows -> a table with exactly `schema` (missing keys become null; unknown keys are an error)."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"row has columns {sorted(extra)} that the schema does not define")
    return pa.Table.from_pylist([{n: row.get(n) for n in schema.names} for row in rows], schema=schema)


def ok_rows(table: pa.Table) -> pa.Table:
    """The rows a downstream stage consumes."""
    return table.filter(table.column("ok"))


def png_struct(png: bytes, path: str | None = None) -> dict:
    return {"bytes": png, "path": path}


class SchemaError(ValueError):
    """A table does not have the columns (or column types) its reader expects."""


def check_schema(
    actual: pa.Schema,
    expected: pa.Schema,
    *,
    table: str,
    columns: list[str] | None = None,
    where: str | None = None,
) -> None:
    """Raise SchemaError naming the first missing or mistyped column.

    `columns` limits the check to the columns a reader uses (a stage reads only some); None checks every column of
    `expected` and also refuses columns it does not define. `where` names the file, when there is one.
    Nullability and schema metadata are not compared: Parquet round trips keep types, not always those.
    """
    at = f" in {where}" if where else ""
    for name in columns if columns is not None else expected.names:
        want = expected.field(name).type
        if name not in actual.names:
            raise SchemaError(f"table '{table}'{at} has no column '{name}' (expected type {want}); "
                              f"it was written by an older or different stage: rerun the stage that writes it")
        got = actual.field(name).type
        if got != want:
            raise SchemaError(f"table '{table}'{at}: column '{name}' has type {got}, expected {want}; "
                              f"rerun the stage that writes it")
    if columns is None:
        extra = [n for n in actual.names if n not in expected.names]
        if extra:
            raise SchemaError(f"table '{table}'{at} has columns {extra} that its schema does not define")


def image_cell(image) -> dict:
    """A PIL image -> the `datasets.Image` struct with its PNG bytes."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return png_struct(buf.getvalue())


def decode_image(cell: dict | None):
    """The struct -> a PIL RGB image, or None when the bytes are missing or do not decode (a counted rejection)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if not cell or not cell.get("bytes"):
        return None
    try:
        image = Image.open(io.BytesIO(cell["bytes"]))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return image.convert("RGB")
