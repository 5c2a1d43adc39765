"""One Prefect task per OSPO stage: read the input tables, call one ospo_core function, write, report, return a
manifest. Retries only for transient faults (connection/timeout on shared storage); model stages run under the
`gpu` concurrency slot so two rounds on one machine take turns on the accelerator."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency

from ospo_core import templates
from ospo_core.config import (
    DensifyConfig, MasksConfig, PerturbConfig, PromptsConfig, QuestionsConfig, RenderConfig, SelectConfig,
    TrainConfig, VQAConfig,
)
from ospo_core.records import TRAIN_HISTORY, to_table
from ospo_core.stages import densify as densify_stage
from ospo_core.stages import masks as masks_stage
from ospo_core.stages import perturb as perturb_stage
from ospo_core.stages import prompts as prompts_stage
from ospo_core.stages import questions as questions_stage
from ospo_core.stages import render as render_stage
from ospo_core.stages import select as select_stage
from ospo_core.stages import vqa as vqa_stage
from ospo_core.testbed import oracle as testbed_oracle
from ospo_core.testbed import render as testbed_render
from ospo_core.testbed import text as testbed_text
from ospo_core.testbed import world as testbed_world
from ospo_core.train import data as train_data
from ospo_core.train import launch as train_launch
from ospo_core.train import loss as train_loss
from ospo_core.train import trainer as trainer_mod
from ospo_core.report import table_counts
from tasks.common import StageContext, StageSpec, bundle_for, cache_key_for, read_ref, run_stage

_SAMPLE_COLUMNS = ("item_id", "sub_category", "side", "k", "prompt", "negative_prompt", "dense_prompt",
                   "rejected_prompt", "questions", "question", "p_yes", "p_no", "perturbation", "source", "reason")


def _transient(task, task_run, state) -> bool:
    """Retry connection and timeout errors (e.g. a network filesystem hiccup), never bad data or bad config."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):
        return True
    except BaseException:
        return False
    return False


STAGE_TASK = dict(persist_result=True, result_serializer="json", retries=2, retry_delay_seconds=5,
                  retry_condition_fn=_transient)


def artifact_key(ctx: StageContext, name: str) -> str:
    """Prefect artifact keys are lowercase letters, digits and dashes."""
    raw = f"{ctx.round_id}-{name}".lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


def report(ctx: StageContext, stage: str, ref: dict, rows_in: int | None) -> None:
    """One table artifact per stage: rows in/out, rejections by reason, a few sample rows."""
    table = read_ref(ref)
    tally = table_counts(table)
    summary = [{"stage": stage, "rows in": rows_in if rows_in is not None else "-", **tally}]
    sample_rows = table.slice(0, 5).to_pylist()
    samples = [{k: _short(v) for k, v in row.items() if k in _SAMPLE_COLUMNS and v is not None} for row in sample_rows]
    create_table_artifact(
        key=artifact_key(ctx, stage),
        table=summary + samples,
        description=f"{stage}: {tally['ok']} of {tally['rows']} rows ok; table at {ref['path']}",
    )
    get_run_logger().info("%s: %s", stage, ", ".join(f"{k}={v}" for k, v in tally.items()))


def _short(value):
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


class Progress:
    """A progress artifact for a long stage, updated as shards (or training steps) finish."""

    def __init__(self, ctx: StageContext, stage: str, what: str):
        self.id = create_progress_artifact(0.0, key=artifact_key(ctx, f"{stage}-progress"),
                                           description=f"{stage}: {what}")
        self.what = what

    def __call__(self, done: int, total: int) -> None:
        update_progress_artifact(self.id, 100.0 * done / max(total, 1))
        get_run_logger().info("%s %d/%d", self.what, done, total)


def _rows(ref: dict | None) -> int | None:
    return ref["rows"] if ref else None


# ---------------------------------------------------------------- 1. initial prompt generation

# The testbed modules are part of a text stage's code: with source=testbed the shapes world writes its table.
PROMPTS = StageSpec("prompts", (), (prompts_stage, templates, testbed_text, testbed_world))


@task(name="generate-prompts", cache_key_fn=cache_key_for(PROMPTS), **STAGE_TASK)
def generate_prompts(ctx: StageContext, cfg: PromptsConfig) -> dict:
    with concurrency("gpu", strict=False):
        ref = run_stage(PROMPTS, ctx, cfg, lambda c, _: prompts_stage.generate_prompts(bundle_for(ctx), c), {})
    report(ctx, "prompts", ref, None)
    return ref


# ---------------------------------------------------------------- 2. hard preference pair generation

NEGATIVES = StageSpec("negatives", ("prompts",), (perturb_stage, templates, testbed_text, testbed_world))


@task(name="perturb", cache_key_fn=cache_key_for(NEGATIVES), **STAGE_TASK)
def perturb(ctx: StageContext, cfg: PerturbConfig, prompts: dict) -> dict:
    table = read_ref(prompts)
    with concurrency("gpu", strict=False):
        ref = run_stage(NEGATIVES, ctx, cfg,
                        lambda c, t: perturb_stage.perturb(t["prompts"], bundle_for(ctx), c, round_prompts=table),
                        {"prompts": prompts}, split={"prompts": table})
    report(ctx, "negatives", ref, prompts["rows"])
    return ref


DENSE = StageSpec("dense", ("negatives",), (densify_stage, templates, testbed_text))


@task(name="densify", cache_key_fn=cache_key_for(DENSE), **STAGE_TASK)
def densify(ctx: StageContext, cfg: DensifyConfig, negatives: dict) -> dict:
    with concurrency("gpu", strict=False):
        ref = run_stage(DENSE, ctx, cfg, lambda c, t: densify_stage.densify(t["negatives"], bundle_for(ctx), c),
                        {"negatives": negatives}, split={"negatives": read_ref(negatives)})
    report(ctx, "dense", ref, negatives["rows"])
    return ref


IMAGES = StageSpec("images", ("dense",), (render_stage, testbed_render))


@task(name="render", cache_key_fn=cache_key_for(IMAGES), **STAGE_TASK)
def render(ctx: StageContext, cfg: RenderConfig, dense: dict) -> dict:
    progress = Progress(ctx, "images", "dense shards rendered")
    with concurrency("gpu", strict=False):
        ref = run_stage(IMAGES, ctx, cfg, lambda c, rows: render_stage.render(rows, bundle_for(ctx), c),
                        {"dense": dense}, shard_input="dense", progress=progress)
    report(ctx, "images", ref, dense["rows"])
    return ref


# ---------------------------------------------------------------- 3. filtering and selection

QUESTIONS = StageSpec("questions", ("prompts", "negatives"), (questions_stage, templates, testbed_text, testbed_world))


@task(name="questions", cache_key_fn=cache_key_for(QUESTIONS), **STAGE_TASK)
def questions(ctx: StageContext, cfg: QuestionsConfig, prompts: dict, negatives: dict) -> dict:
    tables = {"prompts": read_ref(prompts), "negatives": read_ref(negatives)}
    with concurrency("gpu", strict=False):
        ref = run_stage(
            QUESTIONS, ctx, cfg,
            lambda c, t: questions_stage.generate_questions(t["prompts"], t["negatives"], bundle_for(ctx), c,
                                                            round_prompts=tables["prompts"]),
            {"prompts": prompts, "negatives": negatives}, split=tables,
        )
    report(ctx, "questions", ref, prompts["rows"] + negatives["rows"])
    return ref


VQA = StageSpec("vqa", ("images", "questions"), (vqa_stage, testbed_oracle, testbed_world))


@task(name="self-vqa", cache_key_fn=cache_key_for(VQA), **STAGE_TASK)
def self_vqa(ctx: StageContext, cfg: VQAConfig, images: dict, questions: dict) -> dict:
    progress = Progress(ctx, "vqa", "image shards scored")
    question_table = read_ref(questions)
    with concurrency("gpu", strict=False):
        ref = run_stage(VQA, ctx, cfg, lambda c, rows: vqa_stage.self_vqa(rows, question_table, bundle_for(ctx), c),
                        {"images": images, "questions": questions}, shard_input="images", progress=progress)
    report(ctx, "vqa", ref, None)
    return ref


PAIRS = StageSpec("pairs", ("images", "vqa", "questions", "negatives"), (select_stage,))


@task(name="select-pairs", cache_key_fn=cache_key_for(PAIRS), **STAGE_TASK)
def select_pairs(ctx: StageContext, cfg: SelectConfig, images: dict, vqa: dict, questions: dict,
                 negatives: dict) -> dict:
    with concurrency("gpu", strict=False):
        ref = run_stage(
            PAIRS, ctx, cfg,
            lambda c, _: select_stage.select_pairs(read_ref(images), read_ref(vqa), read_ref(questions),
                                                   read_ref(negatives), c, select_stage.model_loglik(bundle_for(ctx))),
            {"images": images, "vqa": vqa, "questions": questions, "negatives": negatives},
        )
    report(ctx, "pairs", ref, None)
    return ref


MASKS = StageSpec("masks", ("pairs", "prompts"), (masks_stage,))


@task(name="object-masks", cache_key_fn=cache_key_for(MASKS), **STAGE_TASK)
def object_masks(ctx: StageContext, cfg: MasksConfig, pairs: dict, prompts: dict) -> dict:
    with concurrency("gpu", strict=False):
        ref = run_stage(MASKS, ctx, cfg,
                        lambda c, _: masks_stage.object_masks(read_ref(pairs), read_ref(prompts), bundle_for(ctx), c),
                        {"pairs": pairs, "prompts": prompts})
    report(ctx, "masks", ref, None)
    return ref


# ---------------------------------------------------------------- 4. object-centric preference optimization

# The number of training processes sets the global batch, so it is part of what training computed.
TRAIN = StageSpec("train_history", ("pairs", "masks"), (trainer_mod, train_loss, train_data, train_launch),
                  execution=("num_processes", "data_parallel"))


@task(name="train", cache_key_fn=cache_key_for(TRAIN), **STAGE_TASK)
def train(ctx: StageContext, cfg: TrainConfig, pairs: dict, masks: dict | None = None) -> dict:
    from ospo_core.janus.load import load_janus
    from transformers import TrainerCallback

    out = ctx.round_path / "train"
    progress = Progress(ctx, "train", "training steps")

    class ReportSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress(state.global_step, state.max_steps)

    def fit(c: TrainConfig, _):
        if ctx.execution.num_processes > 1:  # data parallel: the processes load their own models
            job = train_launch.TrainJob(model=ctx.model, adapters=ctx.adapters, fingerprint=ctx.fingerprint,
                                        pairs=pairs["path"], masks=masks["path"] if masks else None, train=c,
                                        output_dir=str(out), data_parallel=ctx.execution.data_parallel)
            return train_launch.train_data_parallel(job, ctx.execution.num_processes, progress)
        bundle = load_janus(ctx.model, adapters=ctx.adapters)  # its own copy: LoRA layers go into it
        result = trainer_mod.train_ospo(read_ref(pairs), bundle, c, out, masks=read_ref(masks) if masks else None,
                                        callbacks=[ReportSteps()])
        return to_table(result.history.to_pylist(), TRAIN_HISTORY)

    adapter = out / "adapter"
    if ctx.execution.execution == "ray":
        from tasks.scaleout import release

        release()  # the model replicas of the generation stages give their GPUs back for training
    with concurrency("gpu", strict=False):
        ref = run_stage(TRAIN, ctx, cfg, fit, {"pairs": pairs, "masks": masks},
                        extra_outputs=[adapter / "adapter_model.safetensors", adapter / "adapter_config.json"])
    final = {}
    for row in read_ref(ref).to_pylist():
        final[row["metric"]] = row["value"]
    create_table_artifact(key=artifact_key(ctx, "train"), table=[{"metric": k, "final value": v}
                                                                  for k, v in sorted(final.items())],
                          description=f"training: adapter at {adapter}")
    return {**ref, "adapter": str(adapter), "final_metrics": final}


