"""`ospo serve`: Prefect server -> work pools + `gpu` limit -> `prefect deploy --all` -> worker(s), stopped in order.

Safe on a shared machine: the API asks for an auth string (generated once, kept in `<home>/serve/auth` with
user-only permissions), CSRF protection is on, cross-origin requests are answered only for the UI's own origin,
and the workers run nothing but the deployments of prefect.yaml (ospo_cli/worker.py). The children die with this
process, even after a SIGKILL (Linux).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from ospo_cli import ServeError, UsageError, writable_folder
from ospo_cli.server import die_with_parent, healthy, new_auth_string, stop, wait_healthy
from ospo_cli.worker import REPO, deployment_pools

GPU_WORKER = ".venv/bin/python -m ospo_cli.worker --pool ospo-gpu"  # from the checkout, with the server's credentials
WORK_POOLS = {
    "ospo-cpu": "Process workers on CPU machines: the manual round (the tiny model demo, small jobs).",
    "ospo-gpu": "Process workers on GPU machines, one per GPU (CUDA_VISIBLE_DEVICES): nightly rounds, evaluation. "
                "Not Ready = no GPU worker polls it: its runs wait (a scheduled nightly run goes Late) until one is "
                f"started on a GPU machine (`{GPU_WORKER}`, or `ospo serve --gpu-worker` there; "
                "deployments/README.md).",
}
GPU_SLOTS = "gpu"  # global concurrency limit the model stages take a slot of (tasks/stages.py), one at a time
IN_FLIGHT = ("PENDING", "RUNNING", "CANCELLING")


def auth_string(path: Path) -> str:
    """The server's auth string: read from `path`, or generated and written there readable by this user only."""
    if path.exists():
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise UsageError(f"{path} (the API auth string) is readable by other users; `chmod 600 {path}` or delete "
                             "it to have a new one generated")
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = new_auth_string()
    # created with mode 600 from the start: there is no moment when another user could read it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    return value


def server_env(auth: str, ui_origin: str) -> dict[str, str]:
    """The security settings of the server process (Prefect 3.9 names)."""
    return {"PREFECT_SERVER_API_AUTH_STRING": auth,
            "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
            "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ui_origin}


def client_env(api_url: str, auth: str) -> dict[str, str]:
    """What a worker, `prefect deploy` or any other client of the server needs."""
    return {"PREFECT_API_URL": api_url, "PREFECT_API_AUTH_STRING": auth, "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true"}


@contextmanager
def client_of(settings: dict[str, str]):
    from prefect import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: settings["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: settings["PREFECT_API_AUTH_STRING"]}
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        yield client


def serve(host: str, port: int, home: Path, gpu_worker: bool, offline_env: dict[str, str]) -> int:
    """Start everything, print the UI address and the credentials, wait; SIGINT/SIGTERM stop it in order: runs in
    flight are cancelled while the server is still up, then the workers stop, then the server.

    The children run in their own sessions so that Ctrl-C reaches this process only and the shutdown keeps its order.
    """
    if not (REPO / "prefect.yaml").is_file():
        raise UsageError(f"{REPO} has no prefect.yaml: `ospo serve` runs from a checkout of the repository")
    address = f"http://{_client_host(host)}:{port}"
    api_url = f"{address}/api"
    if healthy(api_url):
        raise UsageError(f"a server already answers at {address}; stop it or pass another --port")
    writable_folder(home / "serve", "artifact folder")
    auth_path = home / "serve" / "auth"
    auth = auth_string(auth_path)
    settings = client_env(api_url, auth)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    # the workers get the home resolved here, as `ospo run` would, not one relative to the checkout they chdir to
    env = {**base, **offline_env, **settings, "OSPO_REPO": str(REPO), "OSPO_HOME": str(home)}
    pools = ["ospo-cpu", "ospo-gpu"] if gpu_worker else ["ospo-cpu"]
    log_path = home / "serve" / "server.log"
    prefect = [sys.executable, "-m", "prefect"]

    children: list[tuple[str, subprocess.Popen]] = []
    # Ctrl-C and `kill` both stop in order; SIGINT explicitly too, as a shell starting us in the background
    # would have us ignore it
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting the Prefect server on {address} (log: {log_path})", flush=True)
        with open(log_path, "ab") as log:
            server = subprocess.Popen(
                [*prefect, "server", "start", "--host", host, "--port", str(port)],
                env={**env, **server_env(auth, address)}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent())
        children.append(("server", server))
        wait_healthy(api_url, server, log_path, timeout=180)
        _provision(settings)
        print("deploying prefect.yaml ...", flush=True)
        _deploy(prefect, env)
        for pool in pools:
            worker = subprocess.Popen(
                [sys.executable, "-m", "ospo_cli.worker", "--pool", pool,
                 "--name", f"{pool}-{socket.gethostname()}-{os.getpid()}"],
                env=env, cwd=REPO, start_new_session=True, preexec_fn=die_with_parent())
            children.append((f"{pool} worker", worker))
        pool_of = deployment_pools()
        waiting = [name for name, pool in pool_of.items() if pool not in pools]
        print(f"\nPrefect UI: {address} (on first load it asks for the API auth string: paste the whole line below)\n"
              f"API auth string: {auth} (kept in {auth_path}, readable by you only)\n"
              f"deployments: {', '.join(pool_of)}; worker(s) polling {', '.join(pools)}\n"
              + (f"waiting for a GPU worker: {', '.join(waiting)} (pool ospo-gpu; their runs wait and a scheduled "
                 f"nightly run goes Late until one polls it): on a GPU machine run `{GPU_WORKER}` from the checkout "
                 "with the two variables below, or `ospo serve --gpu-worker` there\n" if waiting else "") +
              f"use it from another shell with: export PREFECT_API_URL={api_url} "
              f"PREFECT_API_AUTH_STRING=\"$(cat {auth_path})\"\n"
              "Ctrl-C stops the workers and the server", flush=True)
        while True:
            for name, child in children:
                if child.poll() is not None:
                    where = f"; see {log_path}" if child is server else ""
                    raise ServeError(f"the {name} exited with status {child.returncode}{where}")
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        # the stop itself is bounded (cancel wait + one grace per child), so a second Ctrl-C cannot cut it short
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if children and healthy(api_url):
                _cancel_in_flight(settings, [child for name, child in children if child is not children[0][1]])
        finally:
            for name, child in reversed(children):
                stop(child, signal.SIGINT)  # Prefect's own graceful stop
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print("stopped")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _client_host(host: str) -> str:
    """The address a client on this machine dials for a server bound to `host`."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _provision(settings: dict[str, str]) -> None:
    """Create the work pools and the `gpu` concurrency limit unless they exist (kept as they are when they do)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with client_of(settings) as client:
        for name, description in WORK_POOLS.items():
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", description=description,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                print(f"created work pool {name}")
            except ObjectAlreadyExists:
                pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOTS, limit=1))
            print(f"created concurrency limit {GPU_SLOTS!r} (1 slot)")
        except ObjectAlreadyExists:
            pass


def _deploy(prefect: list[str], env: dict[str, str]) -> None:
    """`prefect deploy --all` from the checkout, as a user would type it (no prompts).

    Without OSPO_REPO: `prefect deploy` would bake its value into the pull step, and each worker must fill in its own.
    """
    deploy_env = {k: v for k, v in env.items() if k != "OSPO_REPO"} | {"PREFECT_CLI_PROMPT": "false"}
    done = subprocess.run([*prefect, "deploy", "--all"], cwd=REPO, env=deploy_env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise ServeError("`prefect deploy --all` failed:\n" + "\n".join(tail))


def _cancel_in_flight(settings: dict[str, str], workers: list[subprocess.Popen], timeout: float = 5) -> None:
    """Cancel every run in flight: none can finish without the server. A run whose process has not stopped within
    `timeout` seconds (busy in a long tensor operation) is killed and marked Cancelled here, so stopping takes
    seconds. A rerun of the same round id resumes: finished stages are cached, finished shards kept."""
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.states import Cancelled, Cancelling

    in_flight = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(IN_FLIGHT)))
    with client_of(settings) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=in_flight))
        for run in runs:
            print(f"cancelling flow run {run.name} ({run.id})", flush=True)
            client.set_flow_run_state(run.id, Cancelling(message="ospo serve is stopping"), force=True)
        ids = FlowRunFilterId(any_=[run.id for run in runs])
        deadline = time.monotonic() + timeout
        while runs and time.monotonic() < deadline:
            time.sleep(0.5)
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=ids, state=in_flight))
        if not runs:
            return
        for worker in workers:  # the flow-run processes are the workers' children
            for process in _descendants(worker.pid):
                process.kill()
        for run in runs:
            print(f"flow run {run.name} ({run.id}) did not stop within {timeout:.0f}s: killed", file=sys.stderr)
            client.set_flow_run_state(run.id, Cancelled(message="killed: ospo serve stopped"), force=True)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
