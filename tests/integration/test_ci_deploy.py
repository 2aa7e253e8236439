"""The CI deploy command as a CI job runs it: ``scripts/ci-deploy.sh`` against a real Prefect server,
with deploy-release/staging served by ``python -m deployments.serve`` in a process of its own and the
stack on the Kubernetes emulator (tests/fixtures/kube.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.kube import NEVER_READY_IMAGE
from tests.fixtures.prefect_server import PrefectServer, child_env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[2]
CI_DEPLOY = str(ROOT / "scripts" / "ci-deploy.sh")


def ci_deploy(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CI_DEPLOY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_could_not_start_says_why_without_a_throwaway_server(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    cases = {
        "unset": ({}, "PREFECT_API_URL is not set"),
        "no /api": ({"PREFECT_API_URL": f"http://127.0.0.1:{prefect_server.port}"}, "has no /api path"),
        "unreachable": ({"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}, "is unreachable"),
        "no such deployment": ({"PREFECT_API_URL": prefect_server.api_url}, "'deploy-release/nowhere' does"),
    }
    for case, (extra, expected) in cases.items():
        started = time.monotonic()
        result = ci_deploy(child_env(home, **extra), "staging" if case != "no such deployment" else "nowhere")
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert expected in result.stdout, (case, result.stdout)
        # No ephemeral server, no minutes of retries: CI hears about a bad setting at once.
        assert time.monotonic() - started < 30, case
    assert not (home / "prefect.db").exists()


def test_a_server_with_api_auth_refuses_ci_without_the_credentials(
    start_prefect_server, tmp_path: Path
) -> None:
    server = start_prefect_server(auth_string="ci-deployer:correct-horse")
    # The server itself refuses an unauthenticated API call and answers an authenticated one.
    assert httpx.post(f"{server.api_url}/deployments/filter", json={}, timeout=10).status_code == 401
    authed = httpx.post(
        f"{server.api_url}/deployments/filter", json={}, auth=("ci-deployer", "correct-horse"), timeout=10
    )
    assert authed.status_code == 200
    home = tmp_path / "home"
    for auth in (None, "ci-deployer:wrong"):
        env = server.client_env(home, with_auth=False)
        if auth:
            env["PREFECT_API_AUTH_STRING"] = auth
        result = ci_deploy(env, "staging")
        assert result.returncode == 2, result.stdout
        assert "refused our credentials (HTTP 401)" in result.stdout
        assert "wrong" not in result.stdout + result.stderr
    # With the credentials it gets past the check (to the missing deployment).
    result = ci_deploy(server.client_env(home), "staging")
    assert result.returncode == 2
    assert "'deploy-release/staging' does not exist" in result.stdout


@pytest.fixture
def served_deploy_release(prefect_server: PrefectServer, ops_env, runtime_target, tmp_path: Path):
    """deploy-release/staging served from its own process, for the stack of ``runtime_target``."""
    env = prefect_server.client_env(tmp_path / "serve-home", **{**ops_env["env"], **runtime_target.env})
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "deployments.serve", "deploy_release"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "SIGINT or SIGTERM stops within" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield runtime_target
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _version(url: str) -> str:
    response = httpx.get(url, timeout=5)
    return f"{response.status_code} {response.json().get('version')}"


def _run_state(server: PrefectServer, run_name: str) -> str:
    runs = httpx.post(
        f"{server.api_url}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [run_name]}}}, timeout=10
    ).json()
    return str(runs[0]["state"]["type"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("runtime_target", ["kubernetes"], indirect=True)
def test_ci_deploy_exit_codes_follow_the_deploy(
    prefect_server: PrefectServer, served_deploy_release, tmp_path: Path
) -> None:
    target = served_deploy_release
    env = prefect_server.client_env(tmp_path / "ci-home")

    good = ci_deploy(env, "staging", "-p", "image_tag=v3", "-p", "timeout_seconds=30", "--poll", "0.5")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ci-deploy: deployed: run ended Completed" in good.stdout
    assert "release" in good.stdout  # the run's own log lines reach the CI log
    assert _version(target.health_url) == "200 v3"

    bad = ci_deploy(
        env,
        "staging",
        "--params",
        json.dumps({"images": {"backend": target.images["v2"]}, "timeout_seconds": 15}),
        "--poll",
        "0.5",
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    last = bad.stdout.strip().splitlines()[-1]
    assert last.startswith("ci-deploy: FAILED and rolled back: run ended Failed")
    # The reason, not just the state: what failed and where it went back to.
    assert "health check after the deploy failed" in last
    assert "rolled back to" in last
    assert "# Deploy to staging on kubernetes: **failed, rolled back**" in bad.stdout
    assert _version(target.health_url) == "200 v3"

    # A deploy that cannot become ready within CI's time: CI cancels it rather than leaving it running.
    slow = ci_deploy(
        env,
        "staging",
        "--params",
        json.dumps({"images": {"backend": NEVER_READY_IMAGE}, "timeout_seconds": 300}),
        "--timeout",
        "12",
        "--poll",
        "0.5",
    )
    assert slow.returncode == 3, slow.stdout + slow.stderr
    assert "did not finish within 12 s (it ran); cancelling it" in slow.stdout
    run_name = slow.stdout.split("started deploy-release/staging run ", 1)[1].split()[0]
    assert _run_state(prefect_server, run_name) in {"CANCELLED", "CANCELLING"}
    deadline = time.monotonic() + 30
    while _run_state(prefect_server, run_name) != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _run_state(prefect_server, run_name) == "CANCELLED"

    # The cancelled run held no lock: the next deploy goes through.
    again = ci_deploy(env, "staging", "-p", "image_tag=v1", "-p", "timeout_seconds=30", "--poll", "0.5")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _version(target.health_url) == "200 v1"
