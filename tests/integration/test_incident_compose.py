"""Incident operations on a real Docker Engine with Compose v2: a worker scaled to zero and back to its
recorded count, and an app secret rotated in the env file reaching the recreated container."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks import incidents, scaling
from tasks.runtime import get_runtime
from tasks.settings import load_settings
from tests.fixtures.docker_engine import IMAGE_REPO, DockerEngine

pytestmark = pytest.mark.integration

# The container prints the sha256 of the secret it got (never the secret) and idles.
COMPOSE = f"""\
services:
  worker:
    image: {IMAGE_REPO}:v1
    network_mode: none
    init: true
    env_file: [app.env]
    command: ["sh", "-c", "printf %s \\"$$JWT_SECRET\\" | sha256sum; while true; do sleep 1; done"]
    stop_grace_period: 1s
"""


@pytest.fixture
def secret_project(
    docker_engine: DockerEngine, pg_database: tuple[str, str], tmp_path: Path, monkeypatch
) -> Iterator[Path]:
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "docker-compose.yml").write_text(COMPOSE)
    env_file = directory / "app.env"
    env_file.write_text("# app secrets\nJWT_SECRET=first-secret\nNODE_ENV=production\n")
    project = f"s2minc{uuid.uuid4().hex[:8]}"
    env = {
        # Rotation runs in a database transaction even for app secrets: the test's own database.
        "OPS_POSTGRES__DSN": pg_database[1],
        "OPS_RUNTIME__KIND": "compose",
        "OPS_RUNTIME__SERVICES": '["worker"]',
        "OPS_RUNTIME__COMPOSE__PROJECT": project,
        "OPS_RUNTIME__COMPOSE__FILES": f'["{directory / "docker-compose.yml"}"]',
        "OPS_RUNTIME__COMPOSE__PROJECT_DIRECTORY": str(directory),
        "OPS_RUNTIME__COMPOSE__DOCKER_HOST": docker_engine.host,
        "OPS_RUNTIME__COMPOSE__DOCKER_CONFIG": str(docker_engine.config_dir),
        "OPS_RUNTIME__COMPOSE__PULL": "never",
        "OPS_RUNTIME__COMPOSE__STOP_TIMEOUT_SECONDS": "1",
        "OPS_RUNTIME__RELEASE_STORE": str(tmp_path / "releases"),
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
        "OPS_INCIDENTS__APP_SECRETS": '["JWT_SECRET"]',
        "OPS_INCIDENTS__COMPOSE_ENV_FILE": str(env_file),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runtime = get_runtime(load_settings())
    runtime.scale("worker", 1)
    try:
        yield env_file
    finally:
        with contextlib.suppress(Exception):
            runtime.scale("worker", 0)
        client = docker_engine.client()
        try:
            for container in client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={project}"}
            ):
                container.remove(force=True)
        finally:
            client.close()


def _logged_digests(runtime, want: set[str] | None = None, timeout: float = 15) -> set[str]:
    """Digests the worker logged; with ``want``, wait for exactly those (a recreated container may
    not have printed yet, and the old one's logs may still be read while it is removed)."""
    deadline = time.monotonic() + timeout
    while True:
        digests = set(re.findall(r"\b[0-9a-f]{64}\b", runtime.logs("worker", tail=20)))
        done = digests == want if want is not None else bool(digests)
        if done or time.monotonic() > deadline:
            return digests
        time.sleep(0.2)


def test_scale_to_zero_and_back_to_the_recorded_count(secret_project):
    settings = load_settings()
    runtime = get_runtime(settings)
    runtime.scale("worker", 2)
    recorded = scaling.record_replicas(runtime, ["worker", "not-a-service"])
    assert [(r.service, r.replicas) for r in recorded] == [("worker", 2)]
    down = scaling.scale_services(runtime, {"worker": 0})
    assert down[0].changed
    assert not [s for s in runtime.list_services() if s.name == "worker" and s.ready]
    scaling.scale_services(runtime, {r.service: r.replicas for r in recorded})
    statuses = scaling.wait_services_ready(runtime, ["worker"], 30)
    assert [(s.desired, s.ready) for s in statuses] == [(2, 2)]


def test_rotated_env_secret_reaches_the_recreated_container(secret_project):
    settings = load_settings()
    runtime = get_runtime(settings)
    first = {hashlib.sha256(b"first-secret").hexdigest()}
    assert _logged_digests(runtime, first) == first

    plan = incidents.plan_rotation(settings)
    assert [(t.kind, t.name) for t in plan.targets] == [("app-secret", "JWT_SECRET")]
    record = incidents.rotate_secrets(settings, plan, confirm=True)
    new = incidents.parse_env(secret_project.read_text())["JWT_SECRET"]
    assert new != "first-secret"
    assert secret_project.read_text().splitlines()[0] == "# app secrets"

    changes = incidents.restart_for_new_config(settings, runtime, ["worker"])
    assert [c.operation for c in changes] == ["recreate"]
    scaling.wait_services_ready(runtime, ["worker"], 30)
    expected = {hashlib.sha256(new.encode()).hexdigest()}
    digests = _logged_digests(runtime, expected)
    assert digests == expected
    assert record.secrets[0].new_fingerprint == next(iter(digests))[:8]
