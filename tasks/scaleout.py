"""Model stages spread over a Ray cluster through Prefect's Ray task runner (the optional `ray` extra).

`execution: ray` in the round config sends the text stages (negatives, dense, questions), rendering and self-VQA
here (via `runner.shard_map`):

- one `ModelReplica` actor per worker slot (`workers_per_node` on every node that can hold one, `gpus_per_worker`
  GPUs each, one CPU core) loads the round's model once and computes the shards of all these stages; an actor, not
  the per-process model cache of plain Ray tasks, because Ray starts and reuses worker processes as it sees fit (and
  ends a GPU task's worker after one call by default), so a cache there would reload the model or hold two copies on
  one GPU;
- every shard is a Prefect task run (`model-shard`, named `<table>-shard-<n>` in the UI) submitted to
  `prefect_ray.RayTaskRunner`; it hands its rows to a replica and returns the replica's table. One shard per replica
  is in flight: each waiting task holds a Ray worker process (with Prefect and the flow's imports), and the gap
  between two shards (a task run's start, well under a second) is small beside a shard's work;
- the stage task in the flow's process writes each finished shard with `store.write_table` under the shard's own
  index, exactly as the single-process path does, so tables do not depend on how a round was run and an interrupted
  stage resumes from its finished shards in either mode;
- a replica whose process dies mid-shard (killed, out of host memory, a node lost) is restarted by Ray, reloads the
  model and is given the same shard again (`max_restarts`, `max_task_retries`); nothing of the dead attempt was
  written, since only whole results come back and shards are renamed into place. An error raised by the stage code
  itself is not retried: it fails the stage with its message.

The replicas serve one model (base + adapters) and live until the training stage, which kills them (`release`) to
have the GPUs; the stages in between (pair selection, masks) use the flow process's own copy of the model. Ray is
started or joined once per process (`connect`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from functools import partial

import pyarrow as pa
import ray
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ospo_core.config import ExecutionConfig
from tasks.context import StageCall, StageContext, bundle_for, with_oom_backoff

log = logging.getLogger("ospo.tasks")

# A replica that dies this often in one round points at a real fault (a shard that always kills its worker).
MAX_RESTARTS = 3
# The run environment of every worker (DESIGN.md "Models"): offline hubs, no telemetry.
WORKER_ENV = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_DATASETS_OFFLINE", "PREFECT_SERVER_ANALYTICS_ENABLED",
              "TRL_EXPERIMENTAL_SILENCE")


def connect(execution: ExecutionConfig) -> None:
    """Join the cluster at `execution.address`, or start a single-machine one (once per process)."""
    if ray.is_initialized():
        return
    env = {"env_vars": {name: os.environ[name] for name in WORKER_ENV if name in os.environ}}
    if execution.address is None:
        ray.init(namespace="ospo", runtime_env=env, include_dashboard=False)
    else:
        ray.init(address=execution.address, namespace="ospo", runtime_env=env)


def worker_gpus(execution: ExecutionConfig) -> float:
    if execution.gpus_per_worker is not None:
        return execution.gpus_per_worker
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def replica_nodes(execution: ExecutionConfig, gpus: float) -> list[str]:
    """One node id per replica: `workers_per_node` on every live node with room for them."""
    per_node = execution.workers_per_node
    nodes, short = [], []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        cpu, gpu = node["Resources"].get("CPU", 0), node["Resources"].get("GPU", 0)
        if gpus > 0 and gpu == 0:
            continue  # a CPU-only node (often the head) hosts no GPU replica
        if cpu >= per_node and gpu >= per_node * gpus:
            nodes += [node["NodeID"]] * per_node
        else:
            short.append(f"{node['NodeManagerAddress']} (CPU {cpu:g}, GPU {gpu:g})")
    if short or not nodes:
        raise RuntimeError(
            f"execution: workers_per_node={per_node} with gpus_per_worker={gpus:g} needs {per_node} CPU cores and "
            f"{per_node * gpus:g} GPUs on each node; "
            + (f"too small: {', '.join(short)}" if short else "no live node has them")
            + ". Lower workers_per_node or gpus_per_worker, or add nodes."
        )
    return nodes


class StageWork:
    """What a stage asks of the replicas: (cfg, call) in Ray's object store, sent once per replica and stage.

    A plain class on purpose: Prefect resolves Ray object refs it finds in a task's parameters (lists, dicts,
    dataclasses), which would pull the stage's call, with any input table it holds, into every shard task."""

    def __init__(self, stage: str, cfg, call: StageCall):
        self.stage, self.ref = stage, ray.put((cfg, call))


@ray.remote
class ModelReplica:
    """The round's model on one worker, computing the shards of successive stages: `call(cfg, tables)` with the
    OOM back-off. A replica that Ray restarts after its process died loads the model again and takes up the stage
    its retried shard carries."""

    def __init__(self, ctx: StageContext):
        self.work, self.cfg, self.call = None, None, None
        bundle_for(ctx)  # load now, so that the stages' calls find this process's copy through bundle_for(ctx)

    def run(self, work: StageWork, rows) -> pa.Table:
        if self.work != work.ref.hex():
            self.cfg, self.call = ray.get(work.ref)
            self.work = work.ref.hex()
        return with_oom_backoff(self.call, self.cfg, rows)


_POOL: dict = {}  # this process's replicas: {"key": what they hold, "replicas": [actor handles]}


def replicas_for(ctx: StageContext) -> list:
    """The model replicas of this round, started by its first Ray stage and reused by the next ones."""
    key = (ctx.model, ctx.adapters, ctx.fingerprint, ctx.execution)
    if _POOL.get("key") != key or not ray.is_initialized():
        release()
        connect(ctx.execution)
        gpus = worker_gpus(ctx.execution)
        _POOL["replicas"] = [
            ModelReplica.options(
                num_cpus=1, num_gpus=gpus, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),  # soft: restart elsewhere
            ).remote(ctx)
            for node in replica_nodes(ctx.execution, gpus)
        ]
        _POOL["key"] = key
    return _POOL["replicas"]


def release() -> None:
    """Kill this process's model replicas, which frees their (GPU) memory: before training, which needs it."""
    replicas = _POOL.pop("replicas", [])
    _POOL.clear()
    if ray.is_initialized():
        for replica in replicas:
            ray.kill(replica)


@task(name="model-shard", task_run_name="{stage}-shard-{shard}", cache_policy=NO_CACHE, persist_result=False)
def model_shard(replica, work: StageWork, stage: str, shard: int, rows) -> pa.Table:
    """One shard of a stage on one model replica (which Ray restarts and retries if its process dies)."""
    return ray.get(replica.run.remote(work, rows))


@contextlib.contextmanager
def ray_shard_map(ctx: StageContext, stage: str, cfg, call: StageCall):
    """`runner.shard_map` on Ray: the round's replicas (started if needed) compute this stage's parts."""
    replicas = replicas_for(ctx)
    work = StageWork(stage, cfg, call)
    log.info("%s: %d model replicas on Ray", stage, len(replicas))
    # The shard tasks only wait on their replica: they take no CPU slot the replicas need.
    with RayTaskRunner(address=ctx.execution.address) as runner, remote_options(num_cpus=0):
        yield partial(_run_shards, runner, replicas, work)


def _run_shards(runner: RayTaskRunner, replicas: list, work: StageWork, parts: list) -> Iterator[tuple[int, pa.Table]]:
    """Give each idle replica the next (shard, rows) part, in order; yield (shard, table) as each is done."""
    pending = list(reversed(parts))
    idle = list(replicas)
    running = {}  # Ray object ref of the task run -> (Prefect future, shard, replica)
    while pending or running:
        while pending and idle:
            replica = idle.pop()
            shard, rows = pending.pop()
            future = runner.submit(model_shard, {"replica": replica, "work": work, "stage": work.stage,
                                                 "shard": shard, "rows": rows})
            running[future.wrapped_future] = (future, shard, replica)
        (done,), _ = ray.wait(list(running), num_returns=1)
        future, shard, replica = running.pop(done)
        idle.append(replica)
        yield shard, future.result()
