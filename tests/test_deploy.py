"""`ospo serve` end to end: a real Prefect server, the deployments of prefect.yaml, a process worker.

One `ospo serve` per module (20-60 s to migrate a fresh database, deploy and start the worker), bound to
127.0.0.1 on a free port, with its own PREFECT_HOME. The tests talk to it only through the Prefect API, as the UI
does; the last one stops it with SIGINT (Ctrl-C) and checks that nothing it started is left running.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from ospo_core.config import preset_config
from test_flow import small_config

pytestmark = pytest.mark.slow
STAGE_TABLES = ["prompts", "negatives", "dense", "images", "questions", "vqa", "pairs"]


@dataclass
class Served:
    process: subprocess.Popen
    api_url: str
    output: Path
    auth_path: Path  # the API auth string serve generated
    family: list = field(default_factory=list)  # every process it started, recorded while it runs

    def log(self) -> str:
        return self.output.read_text(errors="replace")[-4000:]

    def record_family(self) -> None:
        if self.process.poll() is None:
            known = {p.pid for p in self.family}
            self.family += [p for p in psutil.Process(self.process.pid).children(recursive=True) if p.pid not in known]

    @contextmanager
    def client(self):
        from prefect import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        updates = {PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: self.auth_path.read_text().strip()}
        with temporary_settings(updates=updates), get_client(sync_client=True) as client:
            yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(served: Served, timeout: float = 120) -> int | None:
    """Ctrl-C, as a user would; returns the exit status (None: it had to be killed)."""
    served.record_family()
    returncode = None
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGINT)
        try:
            returncode = served.process.wait(timeout)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()
    else:
        returncode = served.process.returncode
    return returncode


def leftovers(served: Served) -> list[str]:
    """Kill (by pid) every process serve started that is still alive, and name them."""
    alive = []
    for proc in served.family:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(proc.cmdline()))
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    return alive


@contextmanager
def serving(root: Path):
    """`ospo serve` on a free port with its own PREFECT_HOME and home under `root`, until the block ends."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    env.pop("PREFECT_API_URL", None)
    output = root / "serve.out"
    with open(output, "wb") as out:
        # from a folder outside the checkout: serve finds prefect.yaml and the flows by itself
        process = subprocess.Popen(
            [sys.executable, "-m", "ospo_cli", "serve", "--port", str(port), "--home", str(root / "home")],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    served = Served(process, f"http://127.0.0.1:{port}/api", output, root / "home" / "serve" / "auth")
    try:
        deadline = time.monotonic() + 300
        while "Prefect UI: http://127.0.0.1:" not in output.read_text(errors="replace"):
            assert process.poll() is None, f"ospo serve exited with {process.returncode}:\n{served.log()}"
            assert time.monotonic() < deadline, f"ospo serve did not come up:\n{served.log()}"
            time.sleep(0.5)
        served.record_family()
        yield served
    finally:
        stop(served)
        leftovers(served)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve")) as served:
        yield served


def wait_final(served: Served, client, flow_run_id, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert served.process.poll() is None, f"ospo serve died:\n{served.log()}"
        assert time.monotonic() < deadline, f"flow run still {run.state.name} after {timeout}s:\n{served.log()}"
        served.record_family()  # the worker's flow-run process, so a failed test cannot leave it behind
        time.sleep(1)


def test_prefect_yaml_deploys_the_round_nightly_and_eval_with_pools_and_gpu_limit(served):
    with served.client() as client:
        round_ = client.read_deployment_by_name("ospo-round/ospo-round")
        nightly = client.read_deployment_by_name("ospo-self-improve/ospo-nightly")
        evaluate = client.read_deployment_by_name("ospo-evaluate/ospo-eval")
        pools = {name: client.read_work_pool(name) for name in ("ospo-cpu", "ospo-gpu")}
        gpu_limit = client.read_global_concurrency_limit_by_name("gpu")

    # the run form: RoundConfig starting from the demo preset, with ranges and descriptions; the server enforces it
    schema = round_.parameter_openapi_schema
    assert round_.enforce_parameter_schema and round_.parameters == {}
    assert schema["properties"]["config"]["default"] == preset_config("demo").model_dump(mode="json")
    assert schema["properties"]["preset"]["default"] == "demo" and "paper" in schema["properties"]["preset"]["enum"]
    assert all(schema["properties"][name].get("description") for name in ("config", "preset", "home", "promote"))
    cfg_weight = schema["definitions"]["RenderConfig"]["properties"]["cfg_weight"]
    assert cfg_weight["minimum"] == 0 and cfg_weight["maximum"] == 50 and "guidance" in cfg_weight["description"]
    assert cfg_weight["description"].endswith("Range: >= 0, <= 50.")  # the form shows descriptions, not bounds
    quotas = schema["definitions"]["PromptsConfig"]["properties"]["quotas"]
    assert quotas["properties"]["color1"] == {"type": "integer", "minimum": 1, "maximum": 1_000_000, "title": "color1"}
    # a worker runs the code of its own checkout, wherever that is on its machine
    assert round_.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $OSPO_REPO }}"}}]

    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    assert "02:00 UTC" in nightly.description and "ospo-gpu" in nightly.description
    assert nightly.enforce_parameter_schema and evaluate.enforce_parameter_schema
    assert (round_.work_pool_name, nightly.work_pool_name, evaluate.work_pool_name) == ("ospo-cpu", "ospo-gpu",
                                                                                        "ospo-gpu")
    assert {name: pool.type for name, pool in pools.items()} == {"ospo-cpu": "process", "ospo-gpu": "process"}
    # a CPU-only serve: the GPU pool says why it is Not Ready, and serve names what waits and how to start a worker
    assert "Not Ready = no GPU worker polls it" in pools["ospo-gpu"].description
    assert "waiting for a GPU worker: ospo-nightly, ospo-eval" in served.log()
    assert "python -m ospo_cli.worker --pool ospo-gpu" in served.log()
    assert gpu_limit.limit == 1 and gpu_limit.active


def test_the_served_api_wants_the_printed_auth_string(served):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{served.api_url}/admin/settings", timeout=10)
    assert refused.value.code == 401
    assert f"API auth string: {served.auth_path.read_text().strip()}" in served.log()


def test_a_round_started_like_the_ui_runs_on_the_worker_and_its_artifacts_come_back(served, tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    home = tmp_path / "home"
    parameters = {"config": small_config(round_id="ui-round").model_dump(mode="json"), "home": str(home)}
    with served.client() as client:
        deployment = client.read_deployment_by_name("ospo-round/ospo-round")
        created = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        run = wait_final(served, client, created.id)
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[created.id])))
    assert run.state.is_completed(), f"{run.state}:\n{served.log()}"
    assert run.parameters == parameters

    manifest = json.loads((home / "runs" / "ui-round" / "manifest.json").read_text())
    by_key = {a.key: a for a in artifacts}
    for table in STAGE_TABLES:  # per stage a stats table and a samples table with the same columns in every row
        (stats,) = json.loads(by_key[f"ui-round-{table}"].data)
        assert (stats["stage"], stats["rows"]) == (table, manifest["tables"][table]["rows"])
        samples = json.loads(by_key[f"ui-round-{table}-samples"].data)
        assert samples and all(row.keys() == samples[0].keys() for row in samples)
        accepted = [row for row in samples if row["ok"] == "True"]  # accepted rows first, then rejected ones
        assert accepted and all(row["item_id"] for row in accepted)  # sample cells are filled, not blank rows
    assert by_key["ui-round-images-progress"].type == "progress" and by_key["ui-round-images-progress"].data == 100
    for view in ("images", "vqa", "pairs", "train-history"):  # thumbnails the browser can show, not file:// links
        assert "](data:image/png;base64," in by_key[f"ui-round-{view}-view"].data
    summary = by_key["ui-round-summary"]
    assert summary.type == "markdown" and manifest["tables"]["pairs"]["path"] in summary.data
    assert "loss" in summary.data and "file://" not in summary.data  # the final training metrics
    # the wall time `ospo estimate` projects for this round on this machine (a CPU: a GPU profile has no tiny model)
    assert "Wall time `ospo estimate` projects for this round" in summary.data
    if not torch.cuda.is_available():
        assert "estimate (tiny on 1 x cpu)" in summary.data
        assert re.search(r"^total: \d+\.\d\d h$", summary.data, re.M), summary.data
    assert summary.task_run_id is None  # the flow's own artifact: first on the run's Artifacts tab
    assert "ui-round-stages" not in by_key  # the stage count, replaced by the summary when the round finished


@pytest.mark.parametrize("config, field_name, reason", [
    ({"render": {"cfg_weight": -1}}, "config.render.cfg_weight", "less than the minimum of 0"),
    ({"train": {"max_stepz": 20}}, "config.train", "'max_stepz' was unexpected"),
    ({"round_id": "../../etc"}, "config.round_id", "does not match"),
])
def test_the_server_refuses_an_invalid_round_config_with_the_field_name(served, config, field_name, reason):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    with served.client() as client:
        deployment = client.read_deployment_by_name("ospo-round/ospo-round")
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        before = client.count_flow_runs(deployment_filter=only_this)
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
        after = client.count_flow_runs(deployment_filter=only_this)
    assert refused.value.response.status_code == 409
    detail = refused.value.response.json()["detail"]
    assert f"Validation failed for field '{field_name}'" in detail and reason in detail, detail
    assert after == before


def test_a_second_serve_on_the_same_port_is_refused_before_it_starts_anything(served, tmp_path, capsys):
    from ospo_cli.main import main

    port = served.api_url.rsplit(":", 1)[1].split("/")[0]
    assert main(["serve", "--port", port, "--home", str(tmp_path / "home")]) == 2
    assert f"a server already answers at http://127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_ctrl_c_stops_the_worker_and_the_server(served):
    """Last in the module: it ends the module's `ospo serve`."""
    assert stop(served) == 0, served.log()
    assert not leftovers(served), served.log()
    assert "stopped" in served.log()
