"""The temporary Prefect server of `ospo run` / `ospo eval`, and the child-process plumbing `ospo serve` shares.

Without PREFECT_API_URL, Prefect would start its own temporary server inside the caller's process group: Ctrl-C
killed it before the round could report that it stopped (the run then hung on connection retries holding the round
lock, and stayed "Running" in the UI), and a SIGKILL of the caller left it running with an open port. The server
started here runs in its own session, so Ctrl-C reaches the round only, which records the crash and then stops the
server; and the kernel kills it when its parent dies, however that happens (Linux: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ospo_cli import ServeError

log = logging.getLogger("ospo.server")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# loaded here, not in the forked child: dlopen after fork in a threaded parent can deadlock
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `sig` to the child when this process ends, even by SIGKILL.

    None off Linux (no such call): there, a killed parent leaves the child behind, as before.
    """
    if _LIBC is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        if _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)  # the parent already died between fork and prctl: nobody would ever stop us

    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api_url: str) -> bool:
    """`/health` answers without credentials, so this works against a server with an auth string too."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(api_url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """A fresh database is migrated on first start, so this may take a while; a dead server fails at once."""
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise ServeError(f"the Prefect server exited with status {process.returncode} before it answered "
                             f"(log {log_path}): {' | '.join(tail)}")
        if time.monotonic() > deadline:
            raise ServeError(f"the Prefect server did not answer at {api_url} within {timeout:.0f}s; see {log_path}")
        time.sleep(0.25)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    """`sig` (SIGTERM: uvicorn's graceful stop; `ospo serve` sends SIGINT to Prefect's CLI), SIGKILL after `grace`."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def new_auth_string() -> str:
    """Prefect's basic-auth credential, 'user:password'; the password is 192 random bits."""
    return f"ospo:{secrets.token_urlsafe(24)}"


@contextmanager
def temporary_server(attempts: int = 3, timeout: float = 60,
                     server_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """A Prefect API on a free loopback port for the length of the block; yields the client settings to use
    (PREFECT_API_URL and a fresh PREFECT_API_AUTH_STRING, so nobody else on the machine can use it).

    A start that fails or times out (two rounds starting together on one database, a loaded machine) is retried on
    a new port; the last failure is raised as one ServeError line. `server_env` adds settings of the server process.
    """
    auth = new_auth_string()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    # the settings Prefect gives its own temporary server (no UI, ephemeral services), plus the credential
    env |= {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_API_AUTH_STRING": auth} | (server_env or {})
    auth = env["PREFECT_SERVER_API_AUTH_STRING"]
    import prefect  # where uvicorn finds the app; imported here, as only a command that runs a flow needs it

    app_dir = str(Path(prefect.__file__).parent.parent)
    # kept when the start fails, so the error can point at it
    handle, name = tempfile.mkstemp(prefix="ospo-server-", suffix=".log")
    os.close(handle)
    log_path = Path(name)
    for attempt in range(1, attempts + 1):
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "error", "--lifespan", "on"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGKILL))
        try:
            wait_healthy(api_url, process, log_path, timeout)
            break
        except ServeError as exc:
            stop(process)
            if attempt == attempts:
                raise ServeError(f"could not start a temporary Prefect server ({attempts} tries): {exc}; retry, or "
                                 "start one with `prefect server start` and export PREFECT_API_URL") from None
            log.warning("temporary Prefect server, try %d of %d: %s; trying again", attempt, attempts, exc)
        except BaseException:  # Ctrl-C while it starts
            stop(process)
            raise
    log.info("temporary Prefect server on %s (pid %d)", api_url, process.pid)
    try:
        yield {"PREFECT_API_URL": api_url, "PREFECT_API_AUTH_STRING": auth}
    finally:
        stop(process)
        log_path.unlink(missing_ok=True)
