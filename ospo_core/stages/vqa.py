"""Stage 3b, self-VQA: p_yes / p_no for every (image, question) the selection rules need.

Every image (base and negative side) answers its item's base questions (question_set "base"); every base image
also answers each negative prompt's questions (question_set "negative_{k}"), which the v2 rule uses to pick the
rejected prompt for the conditional preference loss. An image whose PNG does not decode gets one ok=False row per
question (reason "corrupt_image"); the rest go on.

The answers come from `tools.judge` (`ospo_core.plugins`): the model itself in the paper; the shapes world's oracle
reads the image tokens, answers with p = 1/0, and leaves a question it cannot read as ok=False
("oracle_unknown_question").
"""

from __future__ import annotations

import pyarrow as pa

from ospo_core.config import VQAConfig
from ospo_core.records import IMAGES, QUESTIONS, VQA, to_table
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


def self_vqa(images: pa.Table, questions: pa.Table, tools, cfg: VQAConfig) -> pa.Table:
    sets = question_sets(questions)
    judge = tools.judge
    jobs = []  # (image row, question_set, questions)
    for row in ok_input_rows(images, IMAGES, _IMAGE_COLUMNS + list(judge.columns), table_name="images", stage="vqa"):
        item_sets = sets.get(row["item_id"], {})
        names = [n for n in item_sets if n == "base" or row["side"] == "base"]
        jobs += [(row, name, item_sets[name]) for name in sorted(names)]
    answers = judge.answer([row for row, _, _ in jobs], [qs for _, _, qs in jobs], cfg.batch_size)
    out = []
    for (row, name, qs), scores in zip(jobs, answers):
        base = {"item_id": row["item_id"], "t2i_category": row["t2i_category"], "sub_category": row["sub_category"],
                "side": row["side"], "k": row["k"], "question_set": name}
        for q_index, question in enumerate(qs):
            cell = {**base, "q_index": q_index, "question": question}
            if scores is None:
                out.append({**cell, "ok": False, "reason": "corrupt_image"})
            elif scores[q_index] is None:
                out.append({**cell, "ok": False, "reason": judge.unknown_reason})
            else:
                p_yes, p_no = scores[q_index]
                out.append({**cell, "p_yes": p_yes, "p_no": p_no, "answer": answer(p_yes, p_no), "ok": True})
    return to_table(out, VQA)
