"""The entry points stop within 10 s on SIGINT/SIGTERM, with no process left behind.

Real processes only: ``python -m deployments.serve`` against a real Prefect server, and
``scripts/run-local.sh`` (what ``make run`` runs) with its own server, signalled the way a terminal's
Ctrl-C (the whole process group) or a supervisor (SIGTERM to the process) does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from deployments.serve import descendants
from tests.fixtures.prefect_server import PrefectServer, child_env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_SECONDS = 10.0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_output(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before '{text}':\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no '{text}' within {timeout}s:\n{log.read_text()[-3000:]}")


def stop_and_time(proc: subprocess.Popen[bytes], send: Callable[[], None]) -> float:
    started = time.monotonic()
    send()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    return time.monotonic() - started


def kill_leftovers(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_started(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait for the entry point's "ready" line; when it never comes, stop its whole process group (the
    Prefect server and serve below it too), so a slow start fails the test without leaving them."""
    try:
        wait_for_output(proc, log, "SIGINT or SIGTERM stops within", timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise


def start_serve(server: PrefectServer, tmp_path: Path, *flows: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "serve.log"
    env = server.client_env(tmp_path / "home", PREFECT_LOGGING_LEVEL="INFO")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve", *flows],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_started(proc, log, timeout=120)
    return proc, log


@pytest.mark.timeout(240)
def test_serve_stops_on_ctrl_c_even_when_the_server_goes_at_the_same_time(
    start_prefect_server, tmp_path: Path
) -> None:
    # make run's Ctrl-C reaches the server and serve together: serve's shutdown must not wait for
    # a server that is gone (seen: minutes of retries while pausing every deployment).
    server = start_prefect_server()
    proc, log = start_serve(server, tmp_path)
    below = set(descendants(proc.pid))
    try:

        def ctrl_c() -> None:
            os.killpg(proc.pid, signal.SIGINT)
            server.stop()

        took = stop_and_time(proc, ctrl_c)
        tail = log.read_text()[-3000:]
        assert proc.poll() is not None, f"serve still runs {took:.0f}s after SIGINT:\n{tail}"
        assert took < STOP_WITHIN_SECONDS, f"serve took {took:.1f}s to stop:\n{log.read_text()[-3000:]}"
        assert not [pid for pid in below if alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_leftovers({pid for pid in below if alive(pid)})


@pytest.mark.timeout(240)
def test_serve_stops_on_sigterm_and_pauses_its_schedules(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    proc, log = start_serve(prefect_server, tmp_path, "health_check")
    try:
        took = stop_and_time(proc, lambda: os.kill(proc.pid, signal.SIGTERM))
        assert proc.poll() == 0, log.read_text()[-3000:]
        assert took < STOP_WITHIN_SECONDS
        # The graceful part still happens while the server is up: no schedule fires with no one serving.
        found = httpx.post(
            f"{prefect_server.api_url}/deployments/filter",
            json={"deployments": {"name": {"any_": ["every-5-minutes"]}}},
            timeout=10,
        ).json()
        assert found
        assert all(d["paused"] for d in found)
    finally:
        if proc.poll() is None:
            proc.kill()


def start_make_run(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "run-local.log"
    env = child_env(tmp_path / "home", PREFECT_PORT=str(free_port()))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / "scripts" / "run-local.sh")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_started(proc, log, timeout=180)
    return proc, log


EMBEDDED_DATABASE = "swagger2mcp"  # what make run creates on the local PostgreSQL when it is missing


@pytest.fixture
def embedded_database_as_found() -> Iterator[None]:
    """make run creates the embedded default stack's database on the shared PostgreSQL when it is
    missing: drop it again afterwards in that case, so the server is left as it was found."""
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        existed = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DATABASE,)
        ).fetchone()
    yield
    if not existed:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{EMBEDDED_DATABASE}" WITH (FORCE)')


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
@pytest.mark.usefixtures("embedded_database_as_found")
def test_make_run_stops_within_10_seconds(tmp_path: Path, how: str) -> None:
    proc, log = start_make_run(tmp_path)
    below = set(descendants(proc.pid))
    assert len(below) >= 2, "expected the Prefect server and serve below run-local.sh"
    try:
        if how == "ctrl-c":
            took = stop_and_time(proc, lambda: os.killpg(proc.pid, signal.SIGINT))
        else:
            took = stop_and_time(proc, lambda: os.kill(proc.pid, signal.SIGTERM))
        assert proc.poll() is not None, f"make run still runs after {took:.0f}s:\n{log.read_text()[-3000:]}"
        assert took < STOP_WITHIN_SECONDS, f"make run took {took:.1f}s to stop:\n{log.read_text()[-3000:]}"
        left = [pid for pid in below if alive(pid)]
        assert not left, f"left running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_leftovers({pid for pid in below if alive(pid)})
