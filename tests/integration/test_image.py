"""The project's image, built for real from the Dockerfile (tests/fixtures/project_image.py): the flow
code imports, the tools the flows call are there, it runs as a non-root user, carries no secret in a
layer, and its worker stops within 10 s on SIGTERM."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tasks.commands import run_command
from tests.fixtures.docker_engine import DockerEngine
from tests.fixtures.prefect_server import PrefectServer
from tests.fixtures.project_image import ProjectImage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

SECRET_LIKE = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|AUTH_STRING|API_KEY|PRIVATE)[A-Z_]*=", re.I)


def docker(engine: DockerEngine, *args: str, timeout: float = 120, check: bool = True) -> str:
    return run_command(
        ["docker", *args], timeout=timeout, env=engine.env, check=check, log_output=False
    ).stdout


def in_image(engine: DockerEngine, image: ProjectImage, *argv: str) -> str:
    return docker(engine, "run", "--rm", "--network", "none", "--entrypoint", argv[0], image.tag, *argv[1:])


def test_image_runs_the_flows_as_a_non_root_user(
    docker_engine: DockerEngine, project_image: ProjectImage
) -> None:
    code = "import flows.health, flows.backup, flows.releases, deployments.serve; print('ok')"
    assert in_image(docker_engine, project_image, "python", "-c", code).strip() == "ok"
    assert in_image(docker_engine, project_image, "id", "-u").strip() not in {"", "0"}
    tools = in_image(
        docker_engine,
        project_image,
        "sh",
        "-c",
        "pg_dump --version && pg_restore --version && git --version && node --version && npm --version"
        " && certbot --version && prefect version | head -1",
    )
    assert "pg_dump (PostgreSQL)" in tools
    assert "git version" in tools
    assert "certbot" in tools
    # The locked versions, not whatever the index had: prefect as pinned.
    lock = (Path(__file__).resolve().parents[2] / "requirements.lock").read_text()
    pinned = re.search(r"^prefect==([^\s]+)", lock, re.M)
    assert pinned
    assert pinned.group(1) in tools
    config = json.loads(docker(docker_engine, "image", "inspect", project_image.tag))[0]["Config"]
    assert not config.get("Healthcheck")
    assert config["User"]
    assert not config["User"].startswith(("0", "root"))


def test_no_secret_in_the_image_history(docker_engine: DockerEngine, project_image: ProjectImage) -> None:
    history = docker(docker_engine, "history", "--no-trunc", "--format", "{{.CreatedBy}}", project_image.tag)
    assert "requirements.lock" in history  # the history is what we think it is
    assert not SECRET_LIKE.search(history), history
    config = json.loads(docker(docker_engine, "image", "inspect", project_image.tag))[0]["Config"]
    env = "\n".join(config.get("Env") or [])
    assert not SECRET_LIKE.search(env), env
    # No credentials file or env file got into the image.
    found = in_image(
        docker_engine,
        project_image,
        "sh",
        "-c",
        "find /app /home/ops -name '*.env' -o -name 'ops.toml' -o -name '.netrc' -o -name 'profiles.toml'",
    )
    assert found.strip() == ""


def test_the_worker_container_stops_within_10_seconds(
    docker_engine: DockerEngine, project_image: ProjectImage, prefect_server: PrefectServer
) -> None:
    name = f"s2m-worker-{int(time.time())}"
    docker(
        docker_engine,
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--env",
        f"PREFECT_API_URL={prefect_server.api_url}",
        project_image.tag,
        "prefect",
        "worker",
        "start",
        "--pool",
        "image-test-pool",
        "--type",
        "process",
    )
    try:
        deadline = time.monotonic() + 120
        while "Worker" not in (logs := docker(docker_engine, "logs", name)) or "started" not in logs:
            assert time.monotonic() < deadline, logs
            time.sleep(0.5)
        started = time.monotonic()
        docker(docker_engine, "kill", "--signal", "TERM", name)
        docker(docker_engine, "wait", name, timeout=30)
        took = time.monotonic() - started
        assert took < 10, f"the worker took {took:.1f}s to stop"
    finally:
        docker(docker_engine, "rm", "--force", name, check=False)
