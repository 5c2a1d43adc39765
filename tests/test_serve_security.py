"""`ospo serve` on a shared machine: the API wants the auth string, CSRF is on, CORS answers only the UI's origin,
and the worker runs nothing but prefect.yaml's deployments (issue 19, point 2)."""

import asyncio
import base64
import json
import stat
import urllib.error
import urllib.request

import pytest

from ospo_cli import UsageError
from ospo_cli.serve import auth_string, server_env
from ospo_cli.server import new_auth_string, temporary_server
from ospo_cli.worker import DeploymentRefused, OSPOWorker, allowed_deployments, check_deployment

UI = "http://127.0.0.1:4200"


def request(url, method="GET", auth=None, origin=None, body=None, headers=()):
    """(status, headers) of one HTTP request; an error status is an answer here, not an exception."""
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", **dict(headers)})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if origin:
        req.add_header("Origin", origin)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.headers


@pytest.fixture(scope="module")
def secured():
    """A server with exactly the settings `ospo serve` gives its own (server_env)."""
    auth = new_auth_string()
    with temporary_server(server_env=server_env(auth, UI)) as settings:
        yield settings["PREFECT_API_URL"], auth


def test_the_api_refuses_requests_without_the_auth_string(secured):
    api, auth = secured
    settings = f"{api}/admin/settings"  # the server's whole configuration: what an intruder would read first
    assert request(settings)[0] == 401
    assert request(settings, auth="ospo:wrong")[0] == 401
    assert request(f"{api}/flows/filter", "POST", body={})[0] in (401, 403)  # a write is refused too
    assert request(f"{api}/health")[0] == 200  # liveness probes still answer
    assert request(settings, auth=auth)[0] == 200


def test_state_changing_requests_need_a_csrf_token(secured):
    api, auth = secured
    status, _ = request(f"{api}/flows/", "POST", auth=auth, body={"name": "not-from-a-prefect-client"})
    assert status == 403


def test_a_foreign_origin_gets_no_cors_permission_and_the_ui_origin_does(secured):
    api, auth = secured
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    _, foreign = request(f"{api}/flows/filter", "OPTIONS", origin="http://evil.example", headers=preflight)
    assert "access-control-allow-origin" not in {k.lower() for k in foreign.keys()}
    _, ours = request(f"{api}/flows/filter", "OPTIONS", origin=UI, headers=preflight)
    assert ours.get("access-control-allow-origin") == UI


def test_the_auth_string_is_kept_readable_by_its_owner_only_and_reused(tmp_path):
    path = tmp_path / "serve" / "auth"
    first = auth_string(path)
    assert first.startswith("ospo:") and len(first) > 30
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth_string(path) == first  # a restart keeps the credentials the remote workers hold
    path.chmod(0o644)
    with pytest.raises(UsageError, match="readable by other users; `chmod 600"):
        auth_string(path)


def test_the_worker_refuses_a_deployment_with_a_foreign_pull_step_and_the_script_never_runs(prefect, tmp_path):
    """The attack of issue 19: a deployment named like ours whose pull step runs a shell script. The worker marks
    the run Crashed with the reason and starts no process; the same deployment as prefect.yaml declares passes."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    marker = tmp_path / "pwned"
    ours = allowed_deployments()["ospo-round"]
    evil_steps = [{"prefect.deployments.steps.run_shell_script": {"script": f"touch {marker}"}}]

    async def scenario():
        async with get_client() as client:
            pool = f"guarded-{tmp_path.name}"[:50]
            await client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            flow_id = await client.create_flow_from_name("ospo-round")
            evil = await client.create_deployment(flow_id=flow_id, name="ospo-round", work_pool_name=pool,
                                                  entrypoint=ours["entrypoint"], pull_steps=evil_steps)
            run = await client.create_flow_run_from_deployment(evil)
            async with OSPOWorker(work_pool_name=pool) as worker:
                await worker.get_and_submit_flow_runs()
                for _ in range(100):
                    state = (await client.read_flow_run(run.id)).state
                    if state.is_final():
                        break
                    await asyncio.sleep(0.1)
            same = await client.create_deployment(flow_id=flow_id, name="ospo-round", work_pool_name=pool,
                                                  entrypoint=ours["entrypoint"], pull_steps=ours["pull_steps"])
            return state, await client.read_deployment(same), worker

    state, same, worker = asyncio.run(scenario())
    assert state.is_crashed() and "differs from prefect.yaml in pull_steps" in state.message, state
    assert not marker.exists()
    check_deployment(same, None, worker.allowed)  # prefect.yaml's own deployment passes
    with pytest.raises(DeploymentRefused, match="job_variables"):
        check_deployment(same, {"command": "sh -c 'touch x'"}, worker.allowed)
