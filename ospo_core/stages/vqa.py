"""Stage 3b, self-VQA: p_yes / p_no for every (image, question) the selection rules need.

Every image (base and negative side) answers its item's base questions (question_set "base"); every base image
also answers each negative prompt's questions (question_set "negative_{k}"), which the v2 rule uses to pick the
rejected prompt for the conditional preference loss. An image whose PNG does not decode gets one ok=False row per
question (reason "corrupt_image"); the rest go on.
"""

from __future__ import annotations

import pyarrow as pa

from ospo_core.config import VQAConfig
from ospo_core.janus.score import score_yes_no
from ospo_core.records import IMAGES, QUESTIONS, VQA, decode_image, to_table
from ospo_core.stages.common import ok_input_rows
from ospo_core.stages.select import answer

_IMAGE_COLUMNS = ["item_id", "t2i_category", "sub_category", "side", "k", "image"]
_QUESTION_COLUMNS = ["item_id", "side", "k", "questions"]


def question_sets(questions: pa.Table) -> dict[str, dict[str, list[str]]]:
    """item_id -> {"base": [...], "negative_0": [...], ...} from the ok QUESTIONS rows."""
    sets: dict[str, dict[str, list[str]]] = {}
    for row in ok_input_rows(questions, QUESTIONS, _QUESTION_COLUMNS, table_name="questions", stage="vqa"):
        name = "base" if row["side"] == "base" else f"negative_{row['k']}"
        sets.setdefault(row["item_id"], {})[name] = row["questions"]
    return sets


def self_vqa(images: pa.Table, questions: pa.Table, bundle, cfg: VQAConfig) -> pa.Table:
    sets = question_sets(questions)
    jobs = []  # (image row, question_set, questions)
    for row in ok_input_rows(images, IMAGES, _IMAGE_COLUMNS, table_name="images", stage="vqa"):
        item_sets = sets.get(row["item_id"], {})
        names = [n for n in item_sets if n == "base" or row["side"] == "base"]
        jobs += [(row, name, item_sets[name]) for name in sorted(names)]
    decoded = {}
    for row, _, _ in jobs:
        key = (row["item_id"], row["side"], row["k"])
        if key not in decoded:
            decoded[key] = decode_image(row["image"])
    scorable = [j for j in jobs if decoded[(j[0]["item_id"], j[0]["side"], j[0]["k"])] is not None]
    scores = score_yes_no(bundle, [decoded[(r["item_id"], r["side"], r["k"])] for r, _, _ in scorable],
                          [qs for _, _, qs in scorable], batch_size=cfg.batch_size)
    by_job = {id(j): s for j, s in zip(scorable, scores)}
    out = []
    for job in jobs:
        row, name, qs = job
        base = {"item_id": row["item_id"], "t2i_category": row["t2i_category"], "sub_category": row["sub_category"],
                "side": row["side"], "k": row["k"], "question_set": name}
        for q_index, question in enumerate(qs):
            cell = {**base, "q_index": q_index, "question": question}
            if id(job) not in by_job:
                out.append({**cell, "ok": False, "reason": "corrupt_image"})
                continue
            p_yes, p_no = by_job[id(job)][q_index]
            out.append({**cell, "p_yes": p_yes, "p_no": p_no, "answer": answer(p_yes, p_no), "ok": True})
    return to_table(out, VQA)
