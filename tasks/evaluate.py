"""Prefect tasks of a held-out evaluation and of the promotion gate: resolve the model, ask the questions, draw and
judge the images, report the metrics, decide the promotion. Each body calls one ospo_core function.

An evaluation writes its tables through `run_stage` (atomic shards, resume, cache keys that distrust a missing or
changed table) into its own folder:

    runs/<round>/eval/<set>/eval_questions/       questions, written by the model the round STARTED from
    runs/<round>/eval/<set>/{start,trained}/eval/ images of the start model / the trained model and the judge's answers
    runs/<round>/eval/<set>/trained/eval_rejudged/ the trained model's images answered by itself (judge drift)
    <home>/evals/<model id>/<set>/{eval_questions,eval}/   a model outside the rounds

A round's start model and trained model are judged on one question sheet that the trained model had no hand in, and
(with the default fixed judge) by one judge, the start model, so their difference is the drawing's alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ospo_core import evaluate, store
from ospo_core.config import EvalConfig, GateConfig
from ospo_core.janus.load import load_janus
from ospo_core.report import embed, metrics_plot
from tasks.context import StageContext, keep_model
from tasks.report import artifact_key
from tasks.runner import read_ref


class EvalContext(StageContext):
    """A model under evaluation and the folder its evaluation tables go to. `round_id` names the round (or the
    model outside the rounds) in artifact keys; `which` is "start", "trained" or "model"."""

    folder: str
    label: str  # what is evaluated, in words
    prompt_set: str
    which: str

    @property
    def round_path(self) -> Path:
        return Path(self.folder)

    def artifact_name(self, stage: str) -> str:
        return f"eval-{self.prompt_set}-questions" if stage == "eval_questions" else f"eval-{self.prompt_set}-{self.which}"


@task(name="open-eval")
def open_eval(cfg: EvalConfig, home: str | None, round_id: str | None, model: str | None,
              start_model: bool) -> tuple[EvalContext, EvalContext, dict]:
    """(the evaluated model, the model that writes the questions, the prompt-set reference that keys the cache).

    A round's models come from its manifest: its start model, or the start model plus the round's adapter. A model
    outside the rounds is loaded here for its fingerprint and writes its own questions."""
    home_path = Path(home) if home else store.ospo_home()
    if (round_id is None) == (model is None):
        raise ValueError("evaluate either a round (round_id) or a model (model: 'tiny' or a checkpoint folder), "
                         "not both and not neither")
    name = evaluate.prompt_set_name(cfg.prompt_set)
    prompts = evaluate.load_prompt_set(cfg.prompt_set, cfg.limit)
    ref = {"prompt_set": name, "spec": cfg.prompt_set, "limit": cfg.limit, "rows": len(prompts),
           "hash": evaluate.prompts_hash(prompts)}
    common = dict(home=str(home_path), shard_rows=cfg.shard_rows, prompt_set=name)
    if round_id is not None:
        path = store.round_dir(home_path, round_id)
        manifest = store.read_manifest(path)
        start = manifest["model"]
        writer = EvalContext(round_id=round_id, model=start["source"], adapters=tuple(start["adapters"]),
                             fingerprint=start["fingerprint"], label=f"start model of round {round_id}",
                             folder=str(path / "eval" / name), which="start", **common)
        writer = writer.model_copy(update={"start": (writer.model, writer.adapters, writer.fingerprint)})
        if start_model:
            evaluated = writer.model_copy(update={
                "folder": str(evaluate.round_eval_dir(home_path, round_id, name, "start"))})
        elif manifest.get("status") != "finished" or not manifest.get("adapter"):
            raise ValueError(f"round {round_id} has not finished training (status {manifest.get('status')!r}); "
                             f"finish it (`ospo run --round {round_id}`) or evaluate its start model")
        else:
            evaluated = writer.model_copy(update={
                "adapters": (*writer.adapters, manifest["adapter"]), "fingerprint": manifest["fingerprint_after"],
                "label": f"round {round_id} (trained)", "which": "trained",
                "folder": str(evaluate.round_eval_dir(home_path, round_id, name, "trained"))})
    else:
        bundle = load_janus(model)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name).strip("-._") or "model"
        eval_id = f"{slug[:60]}-{bundle.fingerprint[:12]}"
        evaluated = writer = EvalContext(round_id=eval_id, model=model, fingerprint=bundle.fingerprint, label=model,
                                         folder=str(evaluate.model_eval_dir(home_path, eval_id, name)),
                                         which="model", **common)
        keep_model(evaluated, bundle)
    get_run_logger().info("evaluating %s on %s (%d prompts) in %s", evaluated.label, name, len(prompts),
                          evaluated.folder)
    return evaluated, writer, ref


@task(name="eval-report")
def eval_report(ctx: EvalContext, table: dict, judge: str = "self", rejudged: bool = False) -> dict:
    """metrics.json beside the table (metrics_rejudged.json for the images judged again), a summary table artifact,
    the metrics-across-rounds plot (PNG beside the table) and a markdown artifact that links it."""
    metrics = evaluate.eval_metrics(read_ref(table), judge)
    folder = Path(ctx.folder)
    suffix = "_rejudged" if rejudged else ""
    store.write_json(folder / f"metrics{suffix}.json", metrics.model_dump(mode="json"))
    prompt_set = ctx.prompt_set
    key = artifact_key(ctx, f"eval-{prompt_set}-{ctx.which}{suffix.replace('_', '-')}-metrics")
    rows = [{"category": name, "images": c.images, "scored": c.scored, "mean_score": c.mean_score,
             "all_yes": c.all_yes} for name, c in metrics.categories.items()]
    rows.append({"category": "overall (mean over categories)", "images": metrics.images, "scored": metrics.scored,
                 **metrics.overall})
    rows += [{"category": f"tag {tag}: pass rate", "scored": t.scored, "all_yes": t.pass_rate}
             for tag, t in metrics.tags.items()]
    create_table_artifact(key=key, table=rows, description=f"{ctx.label} on {prompt_set}. {metrics.judge}")
    if rejudged:  # the drift numbers sit beside the judge's own; the plot across rounds shows the gate's judge
        get_run_logger().info("%s, judged by %s\n%s", ctx.label, judge, evaluate.metrics_text(metrics))
        return {"metrics": metrics.model_dump(mode="json"), "folder": str(folder)}

    points = evaluate.rounds_history(Path(ctx.home), prompt_set)
    if ctx.which == "model":  # rounds are in the history already (their metrics.json is read back)
        points.append(evaluate.HistoryPoint(ctx.label, metrics, None))
    plot = folder / "metrics_across_rounds.png"
    image = metrics_plot([p.label for p in points], evaluate.history_panels(points), [p.promoted for p in points],
                         title=f"{prompt_set}: metrics across rounds ({judge} judge)",
                         note=f"{metrics.judge} Overall markers: filled = promoted, hollow = kept but not "
                              f"promoted, square = a start model or a model outside the rounds.")
    tmp = plot.with_name(f".{plot.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(plot)
    create_markdown_artifact(key=f"{key}-plot", description=f"metrics across rounds on {prompt_set}", markdown="\n".join([
        f"# {ctx.label} on `{prompt_set}`", "", f"**{metrics.judge}**", "",
        "```", evaluate.metrics_text(metrics), "```", "",
        "Metrics across rounds (filled: promoted, hollow: kept but not promoted), also in "
        f"`{plot}`:", "", embed(image, "metrics across rounds", max_px=900),
        f"", f"Eval table: `{table['path']}`"]))
    get_run_logger().info("%s\n%s", ctx.label, evaluate.metrics_text(metrics))
    return {"metrics": metrics.model_dump(mode="json"), "plot": str(plot), "folder": str(folder)}


@task(name="promotion-gate")
def promotion_gate(home: str | None, round_id: str, cfg: GateConfig, before: dict, after: dict,
                   judge: str = "self") -> dict:
    """Decide with `evaluate.gate_decision` on `judge`'s numbers and record the decision, its reason, both
    evaluations and, when the trained model's images were also judged by the model itself (`after["rejudged"]`),
    the judge drift (self - judge), in the round's registry entry (replaced in place)."""
    home_path = Path(home) if home else store.ospo_home()
    trained = evaluate.EvalMetrics.model_validate(after["metrics"])
    decision = evaluate.gate_decision(evaluate.EvalMetrics.model_validate(before["metrics"]), trained, cfg)
    entry = next((e for e in store.list_entries(home_path) if e["round_id"] == round_id), None)
    if entry is None:
        raise ValueError(f"round {round_id} is not in the registry of {home_path}; register it (close the round) "
                         f"before its promotion is decided")
    own = after.get("rejudged")
    drift = (evaluate.judge_drift(trained, evaluate.EvalMetrics.model_validate(own["metrics"]), cfg.metric)
             if own else None)
    entry = {**entry, "promoted": decision.promote, "decision": decision.reason,
             "gate": {**decision.to_dict(), "judge": judge, "judge_drift": drift,
                      "config": cfg.model_dump(mode="json")},
             "metrics": {**entry.get("metrics", {}),
                         "eval": {"prompt_set": before["metrics"]["prompt_set"], "judge": trained.judge,
                                  "start": before["metrics"], "trained": after["metrics"],
                                  "trained_self_judged": own["metrics"] if own else None}}}
    store.register(home_path, entry)
    rows = "\n".join(f"| {name} | {'-' if d is None else f'{d:+.4f}'} | "
                      f"{'-' if not drift or drift.get(name) is None else f'{drift[name]:+.4f}'} |"
                      for name, d in decision.deltas.items())
    overall = f"\n\nJudge drift overall (the trained model on its own images minus the {judge} judge): " \
              f"{drift['overall']:+.4f}" if drift and drift["overall"] is not None else ""
    create_markdown_artifact(
        key=re.sub(r"[^a-z0-9]+", "-", f"{round_id}-promotion".lower()).strip("-"),
        description=f"promotion gate of round {round_id}",
        markdown=f"# Round `{round_id}`: {'promoted' if decision.promote else 'not promoted'}\n\n{decision.reason}"
                 f"{overall}\n\n| category | change in {decision.metric} ({judge} judge) | judge drift (self - "
                 f"{judge}) |\n|---|---|---|\n{rows}\n\n{trained.judge}")
    get_run_logger().info("round %s: %s%s", round_id, decision.reason, overall.replace("\n", " "))
    return entry
