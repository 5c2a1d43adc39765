"""Stopping `ospo run`: Ctrl-C, SIGTERM and SIGKILL end the round within seconds and leave nothing behind.

A real `ospo run` of the tiny model with the small config of test_flow, on its own temporary Prefect server (no
PREFECT_API_URL), signalled once rendering has started.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ospo_cli import ServeError
from ospo_cli.server import temporary_server
from test_flow import small_config


def start_round(tmp_path):
    settings = tmp_path / "round.json"
    settings.write_text(json.dumps(small_config().model_dump(mode="json", exclude={"round_id", "model"})))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    out = tmp_path / "run.out"
    with open(out, "wb") as log:
        # its own session, as a shell job: a signal to its process group is what Ctrl-C sends
        process = subprocess.Popen([sys.executable, "-m", "ospo_cli", "run", "--home", str(tmp_path / "home"),
                                    "--config", str(settings), "--round", "sig"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Task run 'render" not in out.read_text(errors="replace"):
        assert process.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, "rendering never started:\n" + out.read_text()[-3000:]
        time.sleep(0.1)
    family = psutil.Process(process.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(p.cmdline()) for p in family), "no temporary server was started"
    return process, family, out


def lock_is_free(round_path) -> bool:
    with open(round_path / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def alive(processes) -> list[str]:
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline()))
                p.kill()
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.slow
@pytest.mark.parametrize("signum, group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_ctrl_c_and_sigterm_stop_the_round_in_seconds_mark_it_crashed_and_leave_nothing(tmp_path, signum, group):
    process, family, out = start_round(tmp_path)
    sent = time.monotonic()
    if group:
        os.killpg(process.pid, signum)  # Ctrl-C: the whole foreground process group
    else:
        process.send_signal(signum)
    try:
        returncode = process.wait(15)
    finally:
        left = alive([psutil.Process(process.pid), *family] if process.poll() is None else family)
    log = out.read_text(errors="replace")
    assert time.monotonic() - sent < 15
    assert returncode == 128 + signum, log[-3000:]
    assert not left, left
    # the flow recorded how it ended while its server was still up, and the user is told in one line
    assert "Flow run" in log and "Finished in state Crashed" in log, log[-3000:]
    assert log.strip().splitlines()[-1].startswith(f"stopped by {signal.Signals(signum).name}")
    assert "Traceback" not in log and "connection attempts failed" not in log.lower()
    assert lock_is_free(tmp_path / "home" / "runs" / "sig")


@pytest.mark.slow
def test_a_killed_round_leaves_no_server_behind_and_no_lock(tmp_path):
    process, family, _ = start_round(tmp_path)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family if psutil.pid_exists(p.pid)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not alive(family), "the temporary server outlived its round"
    assert lock_is_free(tmp_path / "home" / "runs" / "sig")


def test_a_temporary_server_that_does_not_start_is_retried_then_reported_in_one_line():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ServeError) as failed:
        with temporary_server(attempts=2, timeout=0.01):
            pass
    message = str(failed.value)
    assert message.startswith("could not start a temporary Prefect server (2 tries)") and "\n" not in message
    assert "export PREFECT_API_URL" in message
    assert not alive([p for p in psutil.Process().children(recursive=True) if p.pid not in before])
