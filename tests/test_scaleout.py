"""Scale-out: a round on a local Ray cluster writes the tables of the single-process run; a model replica killed
mid-shard is restarted and the table is still complete; 2 training processes (gloo; DDP and FSDP) follow the loss
curve of 1 process with twice the gradient accumulation; the base install works without Ray.

The Ray tests need the `ray` extra (`pip install -e '.[test,ray]'`) and are skipped without it; the others are not.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.crash_driver import ITEMS, context, dense_table, write_input
from ospo_core import store
from ospo_core.config import ExecutionConfig, RenderConfig, TrainConfig
from ospo_core.records import IMAGES, PAIRS, SCHEMAS, to_table
from test_flow import small_config

REPO = Path(__file__).resolve().parent.parent
RAY_STAGES = ("negatives", "dense", "images", "questions", "vqa")
TWO_CPU_WORKERS = {"execution": "ray", "workers_per_node": 2, "gpus_per_worker": 0}


@pytest.fixture(scope="module")
def ray_cluster():
    """The local cluster `execution: ray` starts (one per process), shut down after this module."""
    import ray  # the `ray` extra is part of `make test`: a missing one fails, not skips
    from tasks.scaleout import release

    yield ray
    release()
    ray.shutdown()


@pytest.fixture(scope="module")
def rounds(prefect, ray_cluster, tmp_path_factory) -> dict[str, Path]:
    """The same small round, once in this process and once with its model stages on 2 CPU workers.

    A CPU worker computes with one thread (Ray gives it one core); the reference does too, because float sums split
    over another number of threads round differently (the VQA probabilities then differ in their last bits)."""
    from flows.round import ospo_round

    homes = {}
    threads = torch.get_num_threads()
    for mode, execution in (("local", {}), ("ray", TWO_CPU_WORKERS)):
        homes[mode] = tmp_path_factory.mktemp(mode)
        torch.set_num_threads(1)
        try:
            ospo_round(small_config(round_id="r", execution=execution), home=str(homes[mode]))
        finally:
            torch.set_num_threads(threads)
    return homes


def shard_names(home: Path, table: str) -> list[str]:
    return sorted(p.name for p in (home / "runs" / "r" / table).glob("part-*.parquet"))


def read(home: Path, table: str):
    return store.read_table(home / "runs" / "r" / table, SCHEMAS[table], name=table)


def deterministic(table: str, rows: list[dict]) -> list[dict]:
    """The rows that do not measure time (the trainer logs its run time and throughput beside the losses)."""
    if table != "train_history":
        return rows
    return [r for r in rows if not r["metric"].endswith(("runtime", "per_second"))]


@pytest.mark.slow
def test_a_round_on_ray_writes_the_tables_of_the_single_process_run(rounds):
    for table in (*RAY_STAGES, "pairs", "train_history"):
        local, ray = read(rounds["local"], table), read(rounds["ray"], table)
        assert local.num_rows > 0, table
        # row for row: same order, no duplicates, same values
        assert deterministic(table, ray.to_pylist()) == deterministic(table, local.to_pylist()), table
        assert shard_names(rounds["ray"], table) == shard_names(rounds["local"], table), table
    assert len(shard_names(rounds["ray"], "images")) > 1  # the shards really were spread over the workers


@pytest.mark.slow
def test_a_replica_killed_mid_shard_is_restarted_and_the_table_is_complete(rounds, tmp_path):
    from ospo_core import pipeline
    from ospo_core.stages import render as render_stage
    from tasks.context import StageContext
    from tasks.runner import run_stage

    config = small_config(execution=TWO_CPU_WORKERS)
    manifest = store.read_manifest(rounds["local"] / "runs" / "r")
    dense = {"table": "dense", **manifest["tables"]["dense"]}
    ctx = StageContext(round_id="r", home=str(tmp_path), model="tiny", fingerprint=manifest["model"]["fingerprint"],
                       shard_rows=config.shard_rows, execution=config.execution)
    dense_rows = read(rounds["local"], "dense")
    assert dense_rows.num_rows > config.shard_rows  # at least two shards
    victim = dense_rows.column("item_id")[config.shard_rows].as_py()  # first row of shard 1
    died = tmp_path / "died"

    def render_or_die(dense, tools, cfg):
        """Kills its worker process the first time it is given shard 1, before writing anything."""
        if dense.column("item_id")[0].as_py() == victim and not died.exists():
            died.write_text(str(os.getpid()))
            os._exit(1)
        return render_stage.render(dense, tools, cfg)

    spec = pipeline.IMAGES
    run_stage(pipeline.Stage(spec.name, spec.task, render_or_die, reads=spec.reads, uses=spec.uses, shard=spec.shard),
              ctx, config.render, {"dense": dense})
    assert died.is_file()  # the worker did die mid-stage
    got = store.read_table(tmp_path / "runs" / "r" / "images", IMAGES, name="images")
    assert got.to_pylist() == read(rounds["local"], "images").to_pylist()
    keys = got.select(["item_id", "side", "k"]).to_pylist()
    assert len(keys) == len({tuple(k.values()) for k in keys})


def test_replicas_go_where_they_fit_and_a_cluster_too_small_is_refused(monkeypatch):
    import ray  # the `ray` extra is part of `make test`: a missing one fails, not skips
    from tasks.scaleout import replica_nodes

    def node(name, cpus, gpus, alive=True):
        return {"NodeID": name, "NodeManagerAddress": f"10.0.0.{len(name)}", "Alive": alive,
                "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    cluster = [node("head", 8, 0), node("gpu-a", 32, 4), node("gpu-b", 32, 4), node("gone", 32, 4, alive=False)]
    monkeypatch.setattr(ray, "nodes", lambda: cluster)
    per_gpu = ExecutionConfig(execution="ray", workers_per_node=4, gpus_per_worker=1)
    assert replica_nodes(per_gpu, 1.0) == ["gpu-a"] * 4 + ["gpu-b"] * 4  # the CPU-only head gets no GPU replica
    assert replica_nodes(per_gpu.model_copy(update={"workers_per_node": 2}), 0.0) == [
        "head", "head", "gpu-a", "gpu-a", "gpu-b", "gpu-b"]  # CPU workers: every node
    with pytest.raises(RuntimeError, match="8 GPUs on each node; too small.*Lower workers_per_node"):
        replica_nodes(per_gpu.model_copy(update={"workers_per_node": 8}), 1.0)


@pytest.mark.slow
def test_two_training_processes_follow_one_process_with_twice_the_accumulation(prefect, tmp_path):
    """Global batch 4 pairs either way: 2 gloo processes x 2 pairs x 1 micro-batch, or 1 x 2 pairs x 2 micro-batches.
    The gradients are averaged over the same 4 pairs, so the losses and the adapter agree to float rounding, with
    DDP and with FSDP. (While the trainer called the language model beside the DDP wrapper, the gradients were not
    averaged and step 2's loss already differed in the third decimal.)"""
    from ospo_core.janus.load import load_janus
    from ospo_core.plugins import tools_for
    from ospo_core.stages.render import render
    from tasks import stages

    bundle = load_janus("tiny", device="cpu")
    images = render(dense_table(), tools_for(bundle), RenderConfig(batch_size=8)).to_pylist()
    pairs = to_table([dict(item_id=b["item_id"], t2i_category=b["t2i_category"], sub_category=b["sub_category"],
                           rule="v2", prompt=b["prompt"], rejected_prompt=r["prompt"], chosen=b["image"],
                           rejected=r["image"], chosen_tokens=b["image_tokens"], rejected_tokens=r["image_tokens"],
                           ok=True) for b, r in zip(images[::2], images[1::2])], PAIRS)
    assert pairs.num_rows == 2 * len(ITEMS)  # 12 pairs: 3 steps of 4 are one epoch, no uneven last batch
    base = dict(max_steps=3, save_steps=10, batch_size=2, learning_rate=1e-3, lora_dropout=0.0, logging_steps=1,
                gradient_checkpointing=False, validation_fraction=0.0)  # every pair trains: 3 steps are one epoch
    runs = {}
    for name, processes, accumulation, data_parallel in (("one", 1, 2, "ddp"), ("ddp", 2, 1, "ddp"),
                                                         ("fsdp", 2, 1, "fsdp")):
        ctx = context(str(tmp_path / name), bundle).model_copy(
            update={"execution": ExecutionConfig(num_processes=processes, data_parallel=data_parallel)})
        ref = stages.train(ctx, TrainConfig(**base, gradient_accumulation_steps=accumulation),
                           pairs=write_input(ctx, "pairs", pairs))
        losses = [r["value"] for r in store.read_table(ref["path"], SCHEMAS["train_history"]).to_pylist()
                  if r["metric"] == "loss"]
        runs[name] = losses, load_file(ctx.round_path / "train" / "adapter" / "adapter_model.safetensors")
    one, one_adapter = runs["one"]
    assert len(one) == 3
    for name in ("ddp", "fsdp"):
        losses, adapter = runs[name]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(one), atol=1e-5, rtol=1e-6, msg=name)
        assert adapter.keys() == one_adapter.keys(), name
        for key in one_adapter:
            torch.testing.assert_close(adapter[key], one_adapter[key], atol=1e-6, rtol=1e-5, msg=f"{name} {key}")


def test_the_base_install_runs_without_ray(tmp_path):
    """With `ray` and `prefect_ray` unimportable, the package, tasks and flows import and a sharded stage runs; asking
    for execution: ray says how to install the extra."""
    code = f"""
import sys
sys.modules["ray"] = None  # import ray -> ImportError, as in an install without the extra
sys.modules["prefect_ray"] = None
import flows.round, flows.self_improve, tasks.stages, ospo_cli.main
from helpers.crash_driver import main
main("render", {str(tmp_path)!r})
from ospo_core.config import ExecutionConfig, RenderConfig
from ospo_core.janus.load import load_janus
from helpers.crash_driver import context, dense_table, write_input
from ospo_core.pipeline import IMAGES
from tasks.runner import run_stage
ctx = context({str(tmp_path / "ray")!r}, load_janus("tiny", device="cpu"))
ctx = ctx.model_copy(update={{"execution": ExecutionConfig(execution="ray")}})
try:
    run_stage(IMAGES, ctx, RenderConfig(), {{"dense": write_input(ctx, "dense", dense_table())}})
except RuntimeError as error:
    assert "pip install" in str(error), error
else:
    raise AssertionError("execution: ray ran without Ray")
assert "tasks.scaleout" not in sys.modules
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    images = store.read_table(tmp_path / "runs" / "crash" / "images", IMAGES, name="images")
    assert images.num_rows == 2 * dense_table().num_rows
