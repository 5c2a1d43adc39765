"""A process worker that runs only the deployments of this checkout's prefect.yaml.

A plain Prefect worker runs whatever the API hands it: a deployment's pull steps are arbitrary (e.g.
`prefect.deployments.steps.run_shell_script`), and so are its job variables (the command, the environment). This
worker compares each flow run's deployment with its namesake in prefect.yaml (entrypoint, pull steps, job
variables) and refuses, before starting any process, a run whose deployment differs or is not there; the run is
marked Crashed with the reason.

    python -m ospo_cli.worker --pool ospo-cpu [--name NAME] [--limit N]

(`ospo serve` starts it; on another machine start it so, from the checkout, with the server's credentials.)
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import anyio
import psutil
import yaml
from prefect.workers.process import ProcessWorker

REPO = Path(__file__).resolve().parent.parent  # the checkout: prefect.yaml and the flows' entrypoints live here


class DeploymentRefused(RuntimeError):
    """A flow run whose deployment is not one of prefect.yaml's, as written there."""


def allowed_deployments(prefect_yaml: Path = REPO / "prefect.yaml") -> dict[str, dict]:
    """Deployment name -> what a worker may run for it: entrypoint, pull steps, job variables."""
    document = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8"))
    return {d["name"]: {"entrypoint": d["entrypoint"],
                        "pull_steps": d.get("pull", document.get("pull")) or [],
                        "job_variables": (d.get("work_pool") or {}).get("job_variables") or {}}
            for d in document["deployments"]}


def deployment_pools(prefect_yaml: Path = REPO / "prefect.yaml") -> dict[str, str]:
    """Deployment name -> the work pool prefect.yaml puts it in."""
    document = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8"))
    return {d["name"]: (d.get("work_pool") or {}).get("name", "") for d in document["deployments"]}


def check_deployment(deployment, flow_run_job_variables: dict | None, allowed: dict[str, dict]) -> None:
    """Raise DeploymentRefused unless `deployment` (a Prefect DeploymentResponse) is as prefect.yaml declares it and
    the flow run overrides none of its job variables."""
    expected = allowed.get(deployment.name)
    if expected is None:
        raise DeploymentRefused(f"deployment {deployment.name!r} is not in prefect.yaml ({sorted(allowed)}); this "
                                "worker runs only those")
    found = {"entrypoint": deployment.entrypoint, "pull_steps": deployment.pull_steps or [],
             "job_variables": deployment.job_variables or {}}
    differs = [key for key in expected if found[key] != expected[key]]
    if flow_run_job_variables:
        differs.append("the flow run's job_variables")
    if differs:
        raise DeploymentRefused(f"deployment {deployment.name!r} differs from prefect.yaml in {', '.join(differs)}; "
                                "this worker runs only what prefect.yaml declares (redeploy it with `ospo serve` or "
                                "`prefect deploy --all`)")


class OSPOWorker(ProcessWorker):
    """ProcessWorker that checks each run's deployment against prefect.yaml before it starts a process."""

    @classmethod
    def __dispatch_key__(cls) -> str:
        # its own registry key: Prefect keeps finding ProcessWorker for "process" pools, and warns of no override
        return "ospo-process"

    def __init__(self, *args, prefect_yaml: Path = REPO / "prefect.yaml", **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed = allowed_deployments(prefect_yaml)

    async def run(self, flow_run, configuration, task_status=None):
        if flow_run.deployment_id is None:
            raise DeploymentRefused(f"flow run {flow_run.name!r} has no deployment; this worker runs only prefect.yaml's")
        deployment = await self.client.read_deployment(flow_run.deployment_id)
        # the error reaches Prefect's submission code, which marks the run Crashed with this message
        check_deployment(deployment, flow_run.job_variables, self.allowed)
        return await super().run(flow_run, configuration, task_status)


async def serve_pool(pool: str, name: str | None, limit: int | None) -> None:
    async with OSPOWorker(work_pool_name=pool, name=name, limit=limit) as worker:
        await worker.start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ospo_cli.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="work pool to poll, e.g. ospo-cpu or ospo-gpu")
    parser.add_argument("--name", help="worker name shown in the UI")
    parser.add_argument("--limit", type=int, help="flow runs at a time (1 per GPU worker)")
    args = parser.parse_args(argv)
    # `ospo serve` dying sends SIGTERM (PR_SET_PDEATHSIG): stop as on Ctrl-C, taking the flow-run processes along
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        anyio.run(serve_pool, args.pool, args.name, args.limit)
    except KeyboardInterrupt:  # `ospo serve` stops its workers with SIGINT, as Ctrl-C would stop `prefect worker`
        pass
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()

if __name__ == "__main__":
    main()
