"""Health check cost: a health-check flow run vs an empty flow run against a running local Prefect
server, and the import time of flows.health vs prefect alone (heavy clients must not be imported).

Starts its own Prefect server (SQLite, temporary home) on 127.0.0.1:15597 and stops it by PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import compare, run_process

ROOT = Path(__file__).resolve().parent.parent
PORT = 15597


def _start_server(home: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(PORT),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("Prefect server did not start")


def main() -> None:
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-health-") as home:
        env = {
            "PREFECT_HOME": home,
            "PREFECT_API_URL": f"http://127.0.0.1:{PORT}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_TASKS_DEFAULT_NO_CACHE": "true",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "OPS_POSTGRES__DSN": "postgresql://postgres@127.0.0.1:5432/postgres",
            "OPS_REDIS__URL": "redis://127.0.0.1:6379/0",
            "PYTHONPATH": str(ROOT),
        }
        compare(
            "import-flows-health-vs-prefect",
            (
                "python -c 'import prefect'",
                lambda: run_process([python, "-c", "import prefect"], env=env, cwd=str(ROOT)),
            ),
            (
                "python -c 'import flows.health'",
                lambda: run_process([python, "-c", "import flows.health"], env=env, cwd=str(ROOT)),
            ),
            repeats=7,
        )
        server = _start_server(home)
        try:
            empty = "from prefect import flow\n@flow(name='empty')\ndef empty():\n    return None\nempty()"
            health = "from flows.health import health_check\nhealth_check(fail_when_unhealthy=False)"
            compare(
                "health-flow-vs-empty-flow",
                ("empty flow run", lambda: run_process([python, "-c", empty], env=env, cwd=str(ROOT))),
                (
                    "health-check flow run",
                    lambda: run_process([python, "-c", health], env=env, cwd=str(ROOT)),
                ),
                repeats=5,
            )
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
