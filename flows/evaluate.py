"""Held-out evaluation of a model (a round's trained or start model, or any checkpoint) as a Prefect flow.

For every prompt of a held-out set (T2I-CompBench's validation lists, GenEval's metadata, or a file of prompts) the
model draws `images_per_prompt` images with fixed seeds and a judge answers yes/no questions about each: GenEval's
metadata becomes questions directly, other prompts get theirs from the questions stage. Per category: the mean
image score and the fraction of images with every answer "yes"; per GenEval tag: the pass rate.

The judge is `config.judge`: fixed by default (a round's start model judges its trained model's images too; a model
outside the rounds judges itself), or self, or GenEval's / T2I-CompBench's procedures on local model folders
(`config.judge_model`). With `rejudge_self`, the same images are also judged by the evaluated model itself, for
the gate's judge drift.

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
                  model: str | None = None, start_model: bool = False, rejudge_self: bool = False) -> dict:
    """Evaluate round `round_id`'s trained model (its start model with `start_model=True`), or `model`.

    Returns {"metrics", "plot", "folder", "questions", "eval"} (and "rejudged": the self-judged metrics, with
    `rejudge_self`): the metrics as JSON and where everything is."""
    evaluated, writer, prompts = open_eval(config, home, round_id, model, start_model)

    # Decompositional questions, written once per round by the model it started from (or by `model` itself).
    questions = stages.eval_questions(writer, config.questions, prompts=prompts)

    # Images with fixed seeds drawn by the evaluated model, answered by the judge on those questions.
    table = stages.judge_eval_images(evaluated, config, questions=questions)

    # Per-category metrics, the summary artifact and the plot across rounds.
    result = {**eval_report(evaluated, table, config.judge), "questions": questions, "eval": table}

    # The same images answered by the evaluated model itself: how far its own verdict drifted from the judge's.
    if rejudge_self and config.judge != "self":
        own = config.model_copy(update={"judge": "self", "judge_model": None})
        rejudged = stages.rejudge_eval_images(evaluated, own, eval=table)
        result["rejudged"] = {**eval_report(evaluated, rejudged, "self", rejudged=True), "eval": rejudged}
    return result
