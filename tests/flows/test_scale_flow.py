"""scale-services under the Prefect harness: Kubernetes (emulator) for the approval rules and a rollback
that keeps the counts; Compose (real Docker Engine) for ``up --scale --no-recreate``, an image change
that keeps the count, and a fixed host port refused before any change."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.releases import deploy_release, rollback_release
from flows.services import scale_services
from tasks.releases import ReleaseStore
from tasks.runtime import get_runtime
from tasks.settings import load_settings
from tests.fixtures.docker_engine import IMAGE_REPO, ComposeStack, DockerEngine, compose_env
from tests.fixtures.ports import claim_port

pytestmark = [pytest.mark.flow, pytest.mark.integration]

BOUNDS = '{"backend": {"min": 1, "max": 4}, "worker": {"min": 1, "max": 3}}'


@pytest.fixture
def kube_env(prefect_harness, ops_env, kube_stack, monkeypatch, tmp_path) -> Any:
    """The emulated cluster at v1 (one replica each), PostgreSQL for the lock, bounds set."""
    env = {
        "OPS_RUNTIME__KIND": "kubernetes",
        "OPS_RUNTIME__KUBERNETES__API_URL": kube_stack.url,
        "OPS_RUNTIME__KUBERNETES__NAMESPACE": kube_stack.namespace,
        "OPS_RUNTIME__RELEASE_STORE": str(tmp_path / "releases"),
        "OPS_RUNTIME__READY_TIMEOUT_SECONDS": "30",
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
        "OPS_HEALTH__URLS": f'["{kube_stack.health_url}"]',
        "OPS_SCALING__BOUNDS": BOUNDS,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return kube_stack


def _scale(cluster: Any, name: str) -> int:
    """The Deployment's replicas as its scale subresource reports them."""
    from kubernetes import client

    with cluster.api() as api:
        deployment = client.AppsV1Api(api).read_namespaced_deployment(name, cluster.namespace)
        return int(deployment.spec.replicas)


def test_kubernetes_within_bounds_applies_without_approval(kube_env):
    planned = scale_services(replicas={"backend": 3})  # dry run by default
    assert planned["outcome"] == "dry run"
    assert planned["plan"][0]["approval"] is None
    assert _scale(kube_env, "backend") == 1

    result = scale_services(replicas={"backend": 3}, dry_run=False, timeout_seconds=30)
    assert result["outcome"] == "succeeded"
    assert result["approval"].startswith("not needed")
    assert result["changes"][0]["commands"] == [
        f"kubectl scale deployment/backend --replicas=3 -n {kube_env.namespace}"
    ]
    assert result["health"]["status"] == "healthy"
    assert _scale(kube_env, "backend") == 3
    record = ReleaseStore.from_settings(load_settings()).all()[-1]
    assert (record.kind, record.status, record.replicas) == (
        "scale",
        "succeeded",
        {"backend": 3, "worker": 1},
    )


def test_kubernetes_outside_bounds_or_to_zero_needs_approval(kube_env):
    for replicas in ({"backend": 6}, {"worker": 0}):
        state = scale_services(
            replicas=replicas, dry_run=False, approval_timeout_seconds=1, return_state=True
        )
        assert state.is_failed(), replicas
        assert {name: _scale(kube_env, name) for name in ("backend", "worker")} == {"backend": 1, "worker": 1}
    assert ReleaseStore.from_settings(load_settings()).all() == []

    stopped = scale_services(replicas={"worker": 0}, dry_run=False, approved=True, timeout_seconds=30)
    assert stopped["plan"][0]["approval"] == "scaling to 0 stops the service"
    assert stopped["approval"].startswith("pre-approved by the `approved` parameter")
    assert _scale(kube_env, "worker") == 0


def test_kubernetes_rollback_after_scaling_keeps_the_replicas(kube_env):
    deploy_release(image_tag="v3", timeout_seconds=30)
    scale_services(replicas={"backend": 3}, dry_run=False, timeout_seconds=30)

    rolled = rollback_release(approved=True, timeout_seconds=30)
    assert rolled["health"]["status"] == "healthy"
    assert rolled["replicas"] == {"backend": 3, "worker": 1}
    assert _scale(kube_env, "backend") == 3
    assert {s.name: s.image for s in get_runtime(load_settings()).list_services()} == {
        "backend": f"{IMAGE_REPO}:v1",
        "worker": f"{IMAGE_REPO}:v1",
    }
    kinds = [r.kind for r in ReleaseStore.from_settings(load_settings()).all()]
    assert kinds == ["baseline", "deploy", "scale", "rollback"]


def _containers(engine: DockerEngine, project: str, service: str) -> list[Any]:
    with contextlib.closing(engine.client()) as client:
        labels = [f"com.docker.compose.project={project}", f"com.docker.compose.service={service}"]
        return client.containers.list(filters={"label": labels})


def test_compose_scales_to_two_containers_keeps_them_on_an_image_change_and_back(
    prefect_harness, ops_env, compose_stack: ComposeStack, monkeypatch, tmp_path
):
    for key, value in {
        **compose_env(compose_stack, tmp_path / "releases"),
        "OPS_SCALING__BOUNDS": BOUNDS,
    }.items():
        monkeypatch.setenv(key, value)
    engine, project = compose_stack.engine, compose_stack.project

    up = scale_services(replicas={"worker": 2}, dry_run=False, timeout_seconds=30)
    assert up["approval"].startswith("not needed")
    assert "--no-recreate" in up["changes"][0]["commands"][0]
    assert len(_containers(engine, project, "worker")) == 2

    # What deploy-release and rollback-release do: a new image must not bring the service back to 1.
    get_runtime(load_settings()).set_images({"worker": engine.images["v3"]})
    workers = _containers(engine, project, "worker")
    assert sorted(c.attrs["Config"]["Image"] for c in workers) == [engine.images["v3"]] * 2

    down = scale_services(replicas={"worker": 1}, dry_run=False, timeout_seconds=30)
    assert down["outcome"] == "succeeded"
    assert len(_containers(engine, project, "worker")) == 1


FIXED_PORT_FILE = """\
services:
  web:
    image: {repo}:v1
    network_mode: none
    init: true
    ports: ["127.0.0.1:{port}:8080"]
    command: ["sh", "-c", "while true; do sleep 1; done"]
    stop_grace_period: 1s
  named:
    image: {repo}:v1
    network_mode: none
    init: true
    container_name: {project}-named
    command: ["sh", "-c", "while true; do sleep 1; done"]
    stop_grace_period: 1s
"""


@pytest.fixture
def fixed_port_stack(docker_engine: DockerEngine, tmp_path: Path) -> Iterator[ComposeStack]:
    """A project whose ``web`` publishes a fixed host port and ``named`` has a container_name, running."""
    project = f"s2mf{uuid.uuid4().hex[:8]}"
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(FIXED_PORT_FILE.format(repo=IMAGE_REPO, port=claim_port(), project=project))
    stack = ComposeStack(docker_engine, project, tmp_path, compose_file, health_url="")
    try:
        stack.compose("up", "--detach", "--pull", "never")
        yield stack
    finally:
        with contextlib.suppress(Exception):
            stack.compose("down", "--timeout", "1")


def test_compose_refuses_a_second_replica_of_a_fixed_port_service(
    prefect_harness, ops_env, fixed_port_stack: ComposeStack, monkeypatch, tmp_path
):
    env = compose_env(fixed_port_stack, tmp_path / "releases")
    env.pop("OPS_HEALTH__URLS")
    for key, value in {**env, "OPS_SCALING__BOUNDS": '{"web": {"min": 1, "max": 3}}'}.items():
        monkeypatch.setenv(key, value)
    engine, project = fixed_port_stack.engine, fixed_port_stack.project
    before = [c.id for c in _containers(engine, project, "web")]

    state = scale_services(replicas={"web": 2}, dry_run=False, return_state=True)
    assert state.is_failed()
    assert "fixed host port 127.0.0.1:" in (state.message or "")
    assert "Nothing was changed" in (state.message or "")
    assert [c.id for c in _containers(engine, project, "web")] == before
    assert ReleaseStore.from_settings(load_settings()).all() == []
    runtime = get_runtime(load_settings())
    assert "container_name" in (runtime.single_replica_reason("named") or "")
