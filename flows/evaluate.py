"""Held-out evaluation of a model (a round's trained or start model, or any checkpoint) as a Prefect flow.

For every prompt of a held-out set (T2I-CompBench's validation lists, GenEval's metadata, or a file of prompts) the
model draws `images_per_prompt` images with fixed seeds and answers yes/no questions about each: GenEval's metadata
becomes questions directly, other prompts get theirs from the questions stage. Per category: the mean local score
and the fraction of images with every answer "yes"; per GenEval tag: the pass rate.

The judge is the evaluated model itself, not GenEval's detector nor T2I-CompBench's scorers: the metrics track the
model across rounds and are not benchmark scores.

Writes the eval table under the round folder (`runs/<round>/eval/<set>/`) or `<home>/evals/<id>/<set>/` for a model
outside the rounds, `metrics.json`, a summary table artifact, and a PNG plot of each metric across rounds linked
from a markdown artifact.

Run it:
    ospo eval --round <round id> --prompts geneval --limit 10
    ospo eval --model tiny --prompts t2i-compbench --limit 2
    prefect deployment run 'ospo-evaluate/ospo-eval'
"""

from __future__ import annotations

from prefect import flow

from ospo_core.config import EvalConfig
from tasks import stages
from tasks.evaluate import eval_report, open_eval


@flow(name="ospo-evaluate", validate_parameters=True)
def ospo_evaluate(config: EvalConfig = EvalConfig(), home: str | None = None, round_id: str | None = None,
                  model: str | None = None, start_model: bool = False) -> dict:
    """Evaluate round `round_id`'s trained model (its start model with `start_model=True`), or `model`.

    Returns {"metrics", "plot", "folder", "questions", "eval"}: the metrics as JSON and where everything is."""
    evaluated, writer, prompts = open_eval(config, home, round_id, model, start_model)

    # Decompositional questions, written once per round by the model it started from (or by `model` itself).
    questions = stages.eval_questions(writer, config.questions, prompts=prompts)

    # Images with fixed seeds, judged by the evaluated model on those questions (self-VQA).
    table = stages.judge_eval_images(evaluated, config, questions=questions)

    # Per-category metrics, the summary artifact and the plot across rounds.
    return {**eval_report(evaluated, table), "questions": questions, "eval": table}
