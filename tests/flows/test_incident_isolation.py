"""Security incident step 1, "Isolate affected systems", and its end, under the Prefect harness with the
real PostgreSQL and Redis (evidence, locks, health): on the Kubernetes emulator a NetworkPolicy that
end-isolation removes again, the policies that were there put back exactly; on the real Docker Engine
a Compose project whose public entry stops answering and answers again."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.incidents import end_isolation, security_incident
from tasks import incidents
from tasks.incidents import IsolationNotRecorded
from tasks.runtime import get_runtime
from tasks.settings import load_settings
from tests.fixtures.docker_engine import IMAGE_REPO, DockerEngine
from tests.fixtures.ports import claim_port

pytestmark = [pytest.mark.flow, pytest.mark.integration]

MERGE = "application/merge-patch+json"


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return "\n".join(json.dumps(a.data) for a in found)


# --- Kubernetes (emulator) -------------------------------------------------------------------------


@pytest.fixture
def kube_isolation_env(prefect_harness, ops_env, kube_stack, monkeypatch) -> dict[str, Any]:
    tmp: Path = ops_env["tmp"]
    env = {
        "OPS_RUNTIME__KIND": "kubernetes",
        "OPS_RUNTIME__KUBERNETES__API_URL": kube_stack.url,
        "OPS_RUNTIME__KUBERNETES__NAMESPACE": kube_stack.namespace,
        "OPS_RUNTIME__STATE_DIR": str(tmp / "state"),
        "OPS_RUNTIME__READY_TIMEOUT_SECONDS": "20",
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
        "OPS_HEALTH__URLS": json.dumps([kube_stack.health_url]),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ops_env


def _policy(
    name: str, namespace: str, selector: dict[str, Any], peers: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": "web"}},
        "spec": {
            "podSelector": selector,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"port": 8080, "protocol": "TCP"}]}],
        },
    }


def _policies(cluster) -> dict[str, dict[str, Any]]:
    from kubernetes import client

    api = cluster.api()
    items = client.NetworkingV1Api(api).list_namespaced_network_policy(cluster.namespace).items
    return {
        p.metadata.name: {
            "labels": p.metadata.labels or {},
            "spec": api.sanitize_for_serialization(p.spec),
        }
        for p in items
    }


def test_kubernetes_isolation_is_a_policy_that_end_isolation_removes_putting_back_what_was_there(
    kube_isolation_env, kube_stack
):
    from kubernetes import client

    networking = client.NetworkingV1Api(kube_stack.api())
    namespace = kube_stack.namespace
    # Lets the ingress controller's namespace reach the backend: it would keep outside traffic coming.
    networking.create_namespaced_network_policy(
        namespace,
        _policy(
            "allow-ingress-controller",
            namespace,
            {"matchLabels": {"app": "backend"}},
            [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}],
        ),
    )
    # Only the namespace's own pods reach the worker: no way in from outside, left alone throughout.
    networking.create_namespaced_network_policy(
        namespace,
        _policy("worker-internal", namespace, {"matchLabels": {"app": "worker"}}, [{"podSelector": {}}]),
    )
    before = _policies(kube_stack)
    state_dir = kube_isolation_env["tmp"] / "state"

    dry = security_incident(isolate=True)
    assert dry["outcome"] == "evidence collected; nothing configured to rotate; isolation dry run"
    assert dry["isolation"]["dry_run"]
    assert any("create NetworkPolicy swagger2mcp-ops-isolation" in a for a in dry["isolation"]["actions"])
    assert any("limit NetworkPolicy allow-ingress-controller" in a for a in dry["isolation"]["actions"])
    assert not any("worker-internal" in a for a in dry["isolation"]["actions"])
    assert _policies(kube_stack) == before
    assert not (state_dir / "isolation").exists()

    # No approval arrives: nothing is changed or recorded (the evidence is kept).
    unapproved = security_incident(isolate=True, dry_run=False, approval_timeout_seconds=2, return_state=True)
    assert unapproved.is_failed()
    assert _policies(kube_stack) == before
    assert not (state_dir / "isolation").exists()

    done = security_incident(isolate=True, dry_run=False, approved=True)
    assert done["outcome"] == "isolated"
    policies = _policies(kube_stack)
    isolation = policies["swagger2mcp-ops-isolation"]
    assert isolation["labels"]["swagger2mcp-ops/isolation"] == "true"
    assert isolation["spec"] == {
        "podSelector": {},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {}}]}],
    }
    assert policies["allow-ingress-controller"]["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]
    assert policies["worker-internal"] == before["worker-internal"]
    # The record names who, when and what, and the evidence taken before the isolation.
    record = json.loads((state_dir / "isolation" / "teststack-staging.json").read_text())
    assert "pre-approved by the `approved` parameter" in record["approval"]
    assert record["isolated_at"]
    assert record["evidence"] == done["evidence"]["prefix"]
    assert record["plan"]["state"]["restricted"]["allow-ingress-controller"]["spec"] == {
        "podSelector": {"matchLabels": {"app": "backend"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}],
                "ports": [{"port": 8080, "protocol": "TCP"}],
            }
        ],
    }
    steps = [s["step"] for s in done["steps"]]
    assert steps.index("collect evidence") < steps.index("isolate: block external traffic")

    plan = end_isolation()
    assert plan["outcome"] == "dry run: would put back 2 thing(s)"
    assert _policies(kube_stack) == policies
    unapproved_end = end_isolation(dry_run=False, approval_timeout_seconds=2, return_state=True)
    assert unapproved_end.is_failed()
    assert _policies(kube_stack) == policies

    ended = end_isolation(dry_run=False, approved=True)
    assert ended["outcome"] == "isolation ended"
    assert ended["health"] == "healthy"
    assert _policies(kube_stack) == before
    assert not (state_dir / "isolation" / "teststack-staging.json").exists()
    assert Path(ended["archived"]).is_file()
    report = _artifact("end-isolation-teststack")
    assert "restore NetworkPolicy allow-ingress-controller as recorded" in report

    refused = end_isolation(dry_run=False, approved=True, return_state=True)
    assert refused.is_failed()
    assert "no isolation of teststack (staging) is recorded" in (refused.message or "")


def test_kubernetes_isolation_of_named_services_selects_their_pods_only(kube_isolation_env, kube_stack):
    """The plain functions: a policy per named Deployment, and a policy on other pods left alone."""
    from kubernetes import client

    networking = client.NetworkingV1Api(kube_stack.api())
    namespace = kube_stack.namespace
    networking.create_namespaced_network_policy(
        namespace,
        _policy("worker-from-anywhere", namespace, {"matchLabels": {"app": "worker"}}, []),
    )
    before = _policies(kube_stack)
    settings = load_settings()
    runtime = get_runtime(settings)
    record = incidents.isolate_systems(settings, runtime, ["backend"], confirm=True, approval="test")
    policies = _policies(kube_stack)
    assert policies["swagger2mcp-ops-isolation-backend"]["spec"]["podSelector"] == {
        "matchLabels": {"app": "backend"}
    }
    assert "swagger2mcp-ops-isolation" not in policies
    # It lets anyone reach the worker's pods, which were not named: left as it is.
    assert policies["worker-from-anywhere"] == before["worker-from-anywhere"]
    assert record.plan.undo == ("delete NetworkPolicy swagger2mcp-ops-isolation-backend",)
    # Again: the isolation in force is kept as recorded, nothing changes.
    again = incidents.isolate_systems(settings, runtime, ["backend"], confirm=True, approval="other")
    assert again.already_in_force
    assert again.approval == "test"
    assert _policies(kube_stack) == policies

    incidents.end_isolation(settings, runtime, confirm=True, approval="test")
    assert set(_policies(kube_stack)) == {"worker-from-anywhere"}
    with pytest.raises(IsolationNotRecorded):
        incidents.end_isolation(settings, runtime, confirm=False)


# --- Compose (real Docker Engine) ------------------------------------------------------------------

ENTRY_COMPOSE = """\
services:
  proxy:
    image: {repo}:v1
    network_mode: host
    init: true
    command: ["app-backend"]
    environment:
      HEALTH_PORT: "{port}"
    stop_grace_period: 1s
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:{port}/cgi-bin/health"]
      interval: 1s
      timeout: 2s
      retries: 3
"""


@pytest.fixture
def entry_project(prefect_harness, ops_env, docker_engine: DockerEngine, monkeypatch) -> Iterator[str]:
    """A Compose project whose public entry (busybox httpd on a claimed port, host network) answers."""
    tmp: Path = ops_env["tmp"]
    directory = tmp / "entry"
    directory.mkdir()
    port = claim_port()
    compose_file = directory / "docker-compose.yml"
    compose_file.write_text(ENTRY_COMPOSE.format(repo=IMAGE_REPO, port=port))
    project = f"s2miso{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{port}/cgi-bin/health"
    env = {
        "OPS_RUNTIME__KIND": "compose",
        "OPS_RUNTIME__SERVICES": '["proxy"]',
        "OPS_RUNTIME__COMPOSE__PROJECT": project,
        "OPS_RUNTIME__COMPOSE__FILES": json.dumps([str(compose_file)]),
        "OPS_RUNTIME__COMPOSE__DOCKER_HOST": docker_engine.host,
        "OPS_RUNTIME__COMPOSE__DOCKER_CONFIG": str(docker_engine.config_dir),
        "OPS_RUNTIME__COMPOSE__PULL": "never",
        "OPS_RUNTIME__COMPOSE__STOP_TIMEOUT_SECONDS": "1",
        "OPS_RUNTIME__COMPOSE__PUBLIC_ENTRY_SERVICES": '["proxy"]',
        "OPS_RUNTIME__STATE_DIR": str(tmp / "state"),
        "OPS_RUNTIME__READY_TIMEOUT_SECONDS": "30",
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
        "OPS_HEALTH__URLS": json.dumps([url]),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runtime = get_runtime(load_settings())
    try:
        runtime.scale("proxy", 1)
        runtime.wait_ready(["proxy"], 30)
        yield url
    finally:
        client = docker_engine.client()
        try:
            for container in client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={project}"}
            ):
                container.remove(force=True)
        finally:
            client.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_answers(url: str, want: bool, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while _answers(url) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return _answers(url)


def test_compose_isolation_stops_the_public_entry_and_end_isolation_starts_it_again(entry_project):
    url = entry_project
    assert _answers(url)
    done = security_incident(isolate=True, dry_run=False, approved=True)
    assert done["outcome"] == "isolated"
    assert [c["target"] for c in done["isolation"]["changes"]] == ["proxy"]
    assert not _wait_answers(url, want=False)
    record = json.loads(Path(done["isolation"]["record"]).read_text())
    assert record["plan"]["state"] == {"running": {"proxy": 1}}
    assert record["plan"]["stopped_services"] == ["proxy"]

    ended = end_isolation(dry_run=False, approved=True)
    assert ended["outcome"] == "isolation ended"
    assert ended["health"] == "healthy"
    assert _wait_answers(url, want=True)
    assert [(c["target"], c["after"]) for c in ended["changes"]] == [("proxy", {"running": "1"})]
