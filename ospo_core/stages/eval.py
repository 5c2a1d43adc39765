"""Held-out evaluation as stages (`ospo_core.evaluate` holds the method): the question sheet of a prompt set,
images drawn with fixed seeds and judged on it shard by shard, and the same images judged again by another judge."""

from __future__ import annotations

import pyarrow as pa

from ospo_core import evaluate
from ospo_core.config import EvalConfig, QuestionsConfig


def eval_questions(prompts: dict, tools, cfg: QuestionsConfig) -> pa.Table:
    """`prompts` is the prompt-set reference ({spec, limit}); GenEval metadata needs no model, plain prompts ask it."""
    items = evaluate.load_prompt_set(prompts["spec"], prompts["limit"])
    needs_model = not all(p.has_metadata for p in items)
    return evaluate.eval_questions(items, tools.model if needs_model else None, cfg)


def judge_images(questions: pa.Table, tools, cfg: EvalConfig) -> pa.Table:
    """Images drawn by the evaluated model, judged by `tools.judge` (cfg.judge)."""
    return evaluate.evaluate(questions, tools, cfg)


def rejudge_images(eval: pa.Table, tools, cfg: EvalConfig) -> pa.Table:
    """An eval table's images judged again by `tools.judge` (the gate asks the trained model itself: judge drift)."""
    return evaluate.rejudge(eval, tools.judge, cfg.batch_size)
