"""Stage 3b, self-VQA: p_yes / p_no for every (image, question) the selection rules need.

Every image (base and negative side) answers its item's base questions (question_set "base"); every base image
also answers each negative prompt's questions (question_set "negative_{k}"), which the v2 rule uses to pick the
rejected prompt for the conditional preference loss. An image whose PNG does not decode gets one ok=False row per
question (reason "corrupt_image"); the rest go on.

`judge="oracle"` (the shapes-world testbed) asks `ospo_core.testbed.oracle` instead of the model: it reads the
image tokens, answers with p = 1/0, and leaves a question it cannot read as ok=False ("oracle_unknown_question").
"""

from __future__ import annotations

import pyarrow as pa

from ospo_core.config import VQAConfig
from ospo_core.janus.score import score_yes_no
from ospo_core.records import IMAGES, QUESTIONS, VQA, decode_image, to_table
from ospo_core.stages.common import ok_input_rows
from ospo_core.stages.select import answer
from ospo_core.testbed.oracle import oracle_scores

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
    columns = _IMAGE_COLUMNS + (["image_tokens"] if cfg.judge == "oracle" else [])
    jobs = []  # (image row, question_set, questions)
    for row in ok_input_rows(images, IMAGES, columns, table_name="images", stage="vqa"):
        item_sets = sets.get(row["item_id"], {})
        names = [n for n in item_sets if n == "base" or row["side"] == "base"]
        jobs += [(row, name, item_sets[name]) for name in sorted(names)]
    if cfg.judge == "oracle":
        by_job = {id(job): oracle_scores(job[0]["image_tokens"], job[2]) for job in jobs}
    else:
        by_job = _self_scores(jobs, bundle, cfg)
    out = []
    for job in jobs:
        row, name, qs = job
        base = {"item_id": row["item_id"], "t2i_category": row["t2i_category"], "sub_category": row["sub_category"],
                "side": row["side"], "k": row["k"], "question_set": name}
        for q_index, question in enumerate(qs):
            cell = {**base, "q_index": q_index, "question": question}
            if id(job) not in by_job:
                out.append({**cell, "ok": False, "reason": "corrupt_image"})
            elif by_job[id(job)][q_index] is None:
                out.append({**cell, "ok": False, "reason": "oracle_unknown_question"})
            else:
                p_yes, p_no = by_job[id(job)][q_index]
                out.append({**cell, "p_yes": p_yes, "p_no": p_no, "answer": answer(p_yes, p_no), "ok": True})
    return to_table(out, VQA)


def _self_scores(jobs: list, bundle, cfg: VQAConfig) -> dict[int, list[tuple[float, float]]]:
    """id(job) -> the model's (p_yes, p_no) per question, for every job whose PNG decodes."""
    decoded = {}
    for row, _, _ in jobs:
        key = (row["item_id"], row["side"], row["k"])
        if key not in decoded:
            decoded[key] = decode_image(row["image"])
    scorable = [j for j in jobs if decoded[(j[0]["item_id"], j[0]["side"], j[0]["k"])] is not None]
    scores = score_yes_no(bundle, [decoded[(r["item_id"], r["side"], r["k"])] for r, _, _ in scorable],
                          [qs for _, _, qs in scorable], batch_size=cfg.batch_size)
    return {id(j): s for j, s in zip(scorable, scores)}
