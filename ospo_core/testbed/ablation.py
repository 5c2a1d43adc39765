"""The ablation table on the shapes world: which parts of OSPO make the drawing better, and can the model judge?

Every setting (`TestbedConfig.settings`, from `config.TESTBED_SETTINGS`: SFT only, SimPO only, SimPO + SFT, the v2
default, v2 with object weighting, DPO with a reference) starts from the same pre-trained checkpoint and runs
`rounds` OSPO rounds with the testbed round config: the world writes prompts, negatives and questions, the model
draws, the judge answers (`TestbedConfig.judges`: the exact oracle, or `self_grid`, the model itself looking at its
PNGs), the v2 rule selects pairs with the model's own likelihoods, and `train_ospo` trains a LoRA adapter, which is
merged before the next round draws its data. Within a seed and judge, every setting sees the same round-1 data
(drawn and judged once by the start model), the same round seeds and the same number of training steps; only the
training objective differs. After each round the model is evaluated on the held-out captions (`testbed.evaluate`),
with the same noise for every setting, and its own judge on the same 512 balanced held-out questions; a
self-judged round also records how often its answers matched the oracle's on the images it chose pairs from.

A round here calls the stage functions directly, in the order of `flows/round.py` (which runs the same functions as
Prefect tasks, with caching and artifacts): Prefect's per-task overhead would dominate rounds that take seconds.
`tests/test_testbed.py` runs a testbed round through the flow too.

Layout of the run folder, per seed and judge (`seed-<s>/<judge>/`): `start/testbed_eval`, `round-1-data/<table>`
(shared by the settings), `<setting>/round-<r>/<table>` (round data from round 2 on, `masks`, `train/adapter`,
`testbed_eval`); and `results.json` (one row per seed, judge, setting, round and category).
"""

from __future__ import annotations

import copy
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
from PIL import Image

from ospo_core import store
from ospo_core.config import TESTBED_SETTINGS, RoundConfig, TestbedConfig
from ospo_core.janus.load import JanusBundle, apply_adapter, load_janus
from ospo_core.plugins import tools_for
from ospo_core.records import SCHEMAS, ok_rows
from ospo_core.stages.common import row_seed
from ospo_core.stages.densify import densify
from ospo_core.stages.masks import object_masks
from ospo_core.stages.perturb import perturb
from ospo_core.stages.prompts import generate_prompts
from ospo_core.stages.questions import generate_questions
from ospo_core.stages.render import render
from ospo_core.stages.select import select
from ospo_core.stages.vqa import self_vqa
from ospo_core.testbed.evaluate import evaluate_scenes, summarize
from ospo_core.testbed.judge import agreement, question_batch
from ospo_core.testbed.oracle import answers
from ospo_core.testbed.model import check_testbed_model
from ospo_core.testbed.pretrain import ensure_checkpoint, shipped_checkpoint
from ospo_core.testbed.render import scene_sheet
from ospo_core.testbed.report import results_plot, results_table
from ospo_core.testbed.world import CATEGORIES, WORLD
from ospo_core.train.trainer import train_ospo

def round_data(config: RoundConfig, bundle: JanusBundle) -> dict[str, pa.Table]:
    """Stages 1-3 of a round (prompts -> pairs) with the round's start model, as flows/round.py orders them."""
    tools = tools_for(bundle, world=config.world, judge=config.vqa.judge, judge_model=config.vqa.judge_model)
    prompts = generate_prompts(tools, config.prompts)
    negatives = perturb(prompts, tools, config.perturb)
    dense = densify(negatives, tools, config.densify)
    images = render(dense, tools, config.render)
    questions = generate_questions(prompts, negatives, tools, config.questions)
    vqa = self_vqa(images, questions, tools, config.vqa)
    pairs = select(images, vqa, questions, negatives, tools, config.select)
    return {"prompts": prompts, "negatives": negatives, "dense": dense, "images": images, "questions": questions,
            "vqa": vqa, "pairs": pairs}


def round_config(cfg: TestbedConfig, checkpoint: Path, seed: int, round_n: int, setting: str,
                 judge: str | None = None) -> RoundConfig:
    """The testbed round of (seed, round) for a setting: its own prompt, render and training seeds, the setting's
    training objective, and the judge (default: the round config's). Seeds do not depend on the setting or the
    judge, so round data differs between them only through the model that draws it and who judges it."""
    document = cfg.round.model_dump()
    document["model"] = str(checkpoint)
    if judge is not None:
        document["vqa"]["judge"] = judge
    if document["vqa"]["judge"] == "self_grid" and cfg.self_judge == "start":
        document["vqa"]["judge_model"] = str(checkpoint)
    # config seeds are 32-bit (row_seed's are 63)
    document["prompts"]["seed"] = row_seed(seed, "prompts", round_n) % 2**32
    document["render"]["seed"] = row_seed(seed, "render", round_n) % 2**32
    document["train"] |= {"seed": seed, **TESTBED_SETTINGS[setting]}
    return RoundConfig.model_validate(document)


def _write(tables: dict[str, pa.Table | None], folder: Path) -> None:
    for name, table in tables.items():
        if table is not None:
            store.write_table(table, store.table_dir(folder, name))


def _evaluate(cfg: TestbedConfig, bundle: JanusBundle, seed: int, folder: Path) -> dict[str, dict[str, float]]:
    """Held-out metrics of a model (its scenes written to folder/testbed_eval), sampled as the rounds render, and
    its judge's agreement with the oracle on the same balanced held-out questions for every model of a seed."""
    table = evaluate_scenes(bundle, cfg.round.render, samples=cfg.eval_samples, seed=seed)
    _write({"testbed_eval": table}, folder)
    summary = summarize(table)
    summary["all"]["judge_agreement"] = agreement(bundle, question_batch(WORLD, random.Random(seed), 512,
                                                                         heldout=True))
    return summary


def round_agreement(data: dict[str, pa.Table]) -> float | None:
    """How well the judge that chose the round's pairs judged the images it chose them from: its answers
    (p_yes > p_no) against the oracle's on the same drawn grids, as balanced accuracy (the mean of the agreement on
    the questions whose true answer is yes and on those whose answer is no), since most questions about a middling
    model's drawings are answered no and a judge that always says no would agree with most of them."""
    grids = {(r["item_id"], r["side"], r["k"]): r["image_tokens"]
             for r in data["images"].select(["item_id", "side", "k", "image_tokens"]).to_pylist()}
    rows = ok_rows(data["vqa"]).select(["item_id", "side", "k", "question", "p_yes", "p_no"]).to_pylist()
    right = {True: [], False: []}
    for r in rows:
        truth = answers(grids[(r["item_id"], r["side"], r["k"])], [r["question"]])[0]
        right[truth].append((r["p_yes"] > r["p_no"]) is truth)
    if not right[True] or not right[False]:
        return None
    return (sum(right[True]) / len(right[True]) + sum(right[False]) / len(right[False])) / 2


def _rows(summary: dict, log, **keys) -> list[dict]:
    log(f"{keys}: exact {summary['all']['exact']:.3f}, recall {summary['all']['recall']:.3f}, "
        f"hallucination {summary['all']['hallucination']:.3f}, judge agreement "
        f"{summary['all']['judge_agreement']:.3f}")
    return [{**keys, "category": category, **metrics} for category, metrics in summary.items()]


def run_seed(cfg: TestbedConfig, checkpoint: Path, run_dir: Path, seed: int, judge: str, log=print) -> list[dict]:
    """Every setting's rounds for one seed and judge; result rows for round 0 (the start, under every setting) to
    `rounds`."""
    start = load_janus(checkpoint)
    check_testbed_model(start)
    top = run_dir / f"seed-{seed}" / judge
    summary = _evaluate(cfg, start, seed, top / "start")
    rows = []
    for setting in cfg.settings:
        rows += _rows(summary, log, seed=seed, judge=judge, setting=setting, round=0, pairs=None,
                      round_agreement=None, train_seconds=None)
    # Round-1 data depends on the start model, the judge and the seeds only: draw it once for every setting.
    shared = round_data(round_config(cfg, checkpoint, seed, 1, cfg.settings[0], judge), start)
    _write(shared, top / "round-1-data")
    for setting in cfg.settings:
        bundle = start
        for round_n in range(1, cfg.rounds + 1):
            config = round_config(cfg, checkpoint, seed, round_n, setting, judge)
            folder = top / setting / f"round-{round_n}"
            data = shared if round_n == 1 else round_data(config, bundle)
            if round_n > 1:
                _write(data, folder)
            pairs = ok_rows(data["pairs"]).num_rows
            seconds = None
            if pairs == 0:
                log(f"seed {seed} {setting} round {round_n}: no pair was selected; the model is not trained")
            else:
                masks = (object_masks(data["pairs"], data["prompts"], tools_for(bundle), config.masks)
                         if config.train.object_weighting else None)
                started = time.perf_counter()
                # Copies: training adds LoRA layers to its model and merging changes weights in place, and
                # `bundle` may be the start model every setting shares.
                result = train_ospo(data["pairs"], copy.deepcopy(bundle), config.train, folder / "train",
                                    masks=masks, resume=False)
                seconds = time.perf_counter() - started
                _write({"masks": masks, "train_history": result.history}, folder)
                bundle = apply_adapter(copy.deepcopy(bundle), result.adapter_dir)
            rows += _rows(_evaluate(cfg, bundle, seed, folder), log, seed=seed, judge=judge, setting=setting,
                          round=round_n, pairs=pairs, train_seconds=seconds,
                          round_agreement=None if judge == "oracle" else round_agreement(data))
    return rows


def run_ablation(cfg: TestbedConfig, checkpoint: str | Path, run_dir: str | Path, log=print) -> list[dict]:
    """Run the table; returns (and writes to run_dir/results.json) one row per seed, judge, setting, round and
    category.

    Seeds and judges are independent, so `cfg.workers` processes run them side by side (each with this process's
    torch thread count); the rows do not depend on how many.
    """
    checkpoint, run_dir = Path(checkpoint), Path(run_dir)
    jobs = [(cfg, checkpoint, run_dir, seed, judge) for seed in cfg.seeds for judge in cfg.judges]
    workers = min(cfg.workers, len(jobs))
    if workers > 1:
        import torch

        # Self-judged jobs take longest (the model answers every question): start them first, so that none starts
        # last while the other workers idle (the default table ran a self-judged seed alone for its last minutes).
        order = sorted(range(len(jobs)), key=lambda i: jobs[i][4] == "oracle")
        # Spawned workers are fresh interpreters (no forked torch or tokenizer state); a worker that dies raises
        # BrokenProcessPool here instead of hanging the table.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)) as pool:
            done = pool.map(run_seed, *zip(*(jobs[i] for i in order)))
            per_seed = [rows for _, rows in sorted(zip(order, done), key=lambda pair: pair[0])]
    else:
        per_seed = [run_seed(*job, log=log) for job in jobs]
    rows = [row for seed_rows in per_seed for row in seed_rows]
    store.write_json(run_dir / "results.json", rows)
    return rows


def read_tables(folder: Path) -> dict[str, pa.Table]:
    """The tables a testbed round folder holds (for inspection and tests)."""
    return {name: _read(folder, name) for name in SCHEMAS if store.table_dir(folder, name).is_dir()}


def _read(folder: Path, name: str) -> pa.Table:
    return store.read_table(store.table_dir(folder, name), SCHEMAS[name], name=name)


def sample_sheet(run_dir: Path, cfg: TestbedConfig, per_category: int = 2) -> Image.Image:
    """Held-out captions of the first seed and judge: the start model's scene, then each setting's after the last
    round."""
    seed = run_dir / f"seed-{cfg.seeds[0]}" / cfg.judges[0]
    folders = [("start", seed / "start")] + [(s, seed / s / f"round-{cfg.rounds}") for s in cfg.settings]
    tables = [(label, _read(folder, "testbed_eval").to_pylist()) for label, folder in folders]
    rows = []
    for category in CATEGORIES:
        picks = [i for i, r in enumerate(tables[0][1]) if r["category"] == category][:per_category]
        for i in picks:
            scenes = [(f"{label}: {'ok' if t[i]['exact'] else 'wrong'}", t[i]["image_tokens"]) for label, t in tables]
            rows.append((tables[0][1][i]["prompt"], scenes))
    return scene_sheet(rows)


def run_testbed(cfg: TestbedConfig, home: Path, checkpoint: Path | None = None, log=print) -> tuple[Path, str]:
    """`ospo testbed`: pre-train (or reuse `checkpoint`), run the ablation, write the table, plot and samples.

    Returns the run folder (<home>/runs/testbed-<time>) and the table as markdown.
    """
    run_dir = store.round_dir(home, time.strftime("testbed-%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=False)
    store.write_json(run_dir / "config.json", cfg.model_dump(mode="json"))
    started = time.perf_counter()
    # The shipped start model when the pre-training settings are its own, so no machine pre-trains by default.
    checkpoint = checkpoint or shipped_checkpoint(cfg.pretrain) or run_dir / "checkpoint"
    checkpoint = ensure_checkpoint(cfg.pretrain, checkpoint, log=log)
    rows = run_ablation(cfg, checkpoint, run_dir, log)
    table = results_table(rows) + f"\n\nCheckpoint: {checkpoint}. Wall time: {time.perf_counter() - started:.0f}s."
    (run_dir / "results.md").write_text(table + "\n")
    results_plot(rows).save(run_dir / "ablation.png")
    sample_sheet(run_dir, cfg).save(run_dir / "samples.png")
    return run_dir, table
