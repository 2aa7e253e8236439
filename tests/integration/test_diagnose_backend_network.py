"""Diagnose's "Network Issues" from inside the backend, beside the ops host's view: probes run in real
containers on the test Docker Engine (busybox images, host network or none) and in pods of the kmock
emulator through the real ``kubernetes`` client's pods/exec websocket (tests/fixtures/kube_exec.py), to
the real PostgreSQL and Redis."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tasks import diagnose as d
from tasks.compose import PROJECT_LABEL, SERVICE_LABEL
from tasks.diagnose import Severity
from tasks.runtime import EXIT_NOT_FOUND, get_runtime
from tasks.settings import OpsSettings, load_settings
from tests.fixtures.core import PG_ADMIN_DSN, REDIS_BASE_URL
from tests.fixtures.diag_services import DIAG_CLOSED_PORT
from tests.fixtures.docker_engine import BASE_IMAGE, DockerEngine
from tests.fixtures.kube_exec import EXEC_NETWORK_ANNOTATION, EXEC_PATH_ANNOTATION

SECRET = "PgProbeSecret"
PG = urlsplit(PG_ADMIN_DSN)
PG_TARGET = f"{PG.hostname}:{PG.port or 5432}"


def _dsn_with_password() -> str:
    netloc = f"{PG.username or 'postgres'}:{SECRET}@{PG.hostname}:{PG.port or 5432}"
    return urlunsplit((PG.scheme, netloc, PG.path, PG.query, PG.fragment))


def _rendered(diagnosis: d.Diagnosis) -> str:
    return repr(diagnosis.rows()) + repr([f.as_row() for f in diagnosis.findings]) + diagnosis.title


def _comparisons(diagnosis: d.Diagnosis) -> dict[str, d.Comparison]:
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.NetworkViewsEvidence)
    return {c.name: c for c in evidence.comparisons}


# --- Docker Engine: busybox containers as the backend ------------------------------------------------


@pytest.fixture
def backend_containers(docker_engine: DockerEngine) -> Iterator[dict[str, str]]:
    """Two one-container "projects" whose backend runs busybox: ``cut-off`` on network none, and
    ``no-nc`` on the host network with its ``nc`` link removed. Yields project names by role."""
    client = docker_engine.client()
    projects = {role: f"s2mn{uuid.uuid4().hex[:8]}" for role in ("cut-off", "no-nc")}
    containers = []
    try:
        for role, network in (("cut-off", "none"), ("no-nc", "host")):
            containers.append(
                client.containers.run(
                    BASE_IMAGE,
                    ["sleep", "600"],
                    detach=True,
                    init=True,
                    network_mode=network,
                    labels={PROJECT_LABEL: projects[role], SERVICE_LABEL: "backend"},
                    name=f"{projects[role]}-backend-1",
                )
            )
        assert containers[1].exec_run(["rm", "/bin/nc"]).exit_code == 0
        yield projects
    finally:
        for container in containers:
            container.remove(force=True)
        client.close()


def _compose_settings(engine: DockerEngine, project: str, **diagnose: Any) -> OpsSettings:
    return load_settings(
        postgres={"dsn": _dsn_with_password()},
        redis={"url": f"{REDIS_BASE_URL}/0"},
        runtime={
            "kind": "compose",
            "services": ["backend"],
            "compose": {
                "project": project,
                "docker_host": engine.host,
                "docker_config": str(engine.config_dir),
            },
        },
        diagnose={"network_timeout_seconds": 2, **diagnose},
    )


def test_compose_backend_cut_off_and_without_nc(
    docker_engine: DockerEngine, backend_containers: dict[str, str]
) -> None:
    # Cut off (network none): the ops host reaches PostgreSQL and Redis, the backend does not.
    cut_off = d.network_from_backend(_compose_settings(docker_engine, backend_containers["cut-off"]))
    views = _comparisons(cut_off)
    assert views["postgres"].host.ok is True
    assert views["postgres"].inside.ok is False
    assert views["postgres"].inside.tool == "nc"  # busybox nc has no -z: a plain connect
    assert "Connection refused" in views["postgres"].inside.detail
    evidence = cut_off.evidence
    assert isinstance(evidence, d.NetworkViewsEvidence)
    assert evidence.instance == f"{backend_containers['cut-off']}-backend-1"
    assert any(u.startswith("nc -z (nc: invalid option") for u in evidence.unusable)
    assert "node (no node)" in evidence.unusable
    difference = "reachable from the ops host but not inside backend"
    differences = [f for f in cut_off.findings if difference in f.summary]
    assert {f.severity for f in differences} == {Severity.CRITICAL}
    assert len(differences) == 2  # PostgreSQL and Redis
    assert "network policy" in (differences[0].resolution or "")
    assert differences[0].runbook == d.RB_NETWORK
    assert SECRET not in _rendered(cut_off)
    rows = {r["target"]: r for r in cut_off.rows()}
    assert rows[f"postgres {PG_TARGET}"]["same"] == "no"

    # No nc at all, host network: falls back to busybox's own nc, and both views agree.
    no_nc = d.network_from_backend(_compose_settings(docker_engine, backend_containers["no-nc"]))
    views = _comparisons(no_nc)
    assert views["postgres"].inside.ok is True
    assert views["postgres"].inside.tool == "busybox nc"
    assert views["redis"].inside.tool == "busybox nc"
    assert [f.severity for f in no_nc.findings] == [Severity.OK]
    assert "probed with busybox nc" in no_nc.findings[0].summary

    # A command past its time limit is reported as such, not waited for.
    runtime = get_runtime(_compose_settings(docker_engine, backend_containers["no-nc"]))
    assert runtime.exec("backend", ["sleep", "5"], 1).timed_out


# --- Kubernetes (emulator): the pod's tools and network set by annotations --------------------------


def _tools(directory: Path, *names: str) -> str:
    directory.mkdir()
    for name in names:
        found = shutil.which(name)
        assert found, f"{name} is needed on this host for the emulated pod"
        os.symlink(found, directory / name)
    return str(directory)


@pytest.fixture
def backend_pod(kube_exec: Any) -> Iterator[tuple[Any, str, str]]:
    """A backend Deployment and its one running pod in a namespace of their own (no controller
    needed: exec reads only the pods). Yields the CoreV1Api, the namespace and the pod's name."""
    from kubernetes import client

    namespace = f"exec-{uuid.uuid4().hex[:8]}"
    api_client = kube_exec.api()
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    labels = {"app": "backend"}
    template = {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "backend", "image": "app"}]}}
    apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "backend", "namespace": namespace, "labels": labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": template},
        },
    )
    pod = "backend-5d8f-0"
    core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": namespace, "labels": labels},
            "spec": template["spec"],
            "status": {"phase": "Running"},
        },
    )
    try:
        yield core, namespace, pod
    finally:
        core.delete_namespaced_pod(pod, namespace)
        apps.delete_namespaced_deployment("backend", namespace)
        api_client.close()


def test_kubernetes_backend_pod_views_over_pods_exec(
    kube_exec: Any, backend_pod: tuple[Any, str, str], tmp_path: Path
) -> None:
    core, namespace, pod = backend_pod

    def annotate(**annotations: str | None) -> None:
        core.patch_namespaced_pod(pod, namespace, {"metadata": {"annotations": annotations}})

    settings = load_settings(
        postgres={"dsn": _dsn_with_password()},
        redis={"url": f"{REDIS_BASE_URL}/0"},
        runtime={
            "kind": "kubernetes",
            "services": ["worker", "backend"],
            "kubernetes": {"api_url": kube_exec.url, "namespace": namespace},
        },
        diagnose={
            "network_timeout_seconds": 2,
            "backend_service": "backend",
            "resolve_hosts": ["localhost", "nosuch-host.invalid"],
        },
    )
    # An image with node and getent (no nc): node probes TCP, getent resolves.
    annotate(**{EXEC_PATH_ANNOTATION: _tools(tmp_path / "node-image", "node", "getent")})
    agreeing = d.network_from_backend(settings)
    views = _comparisons(agreeing)
    assert views["postgres"].inside.ok is True
    assert views["postgres"].inside.tool == "node"
    assert views["localhost"].inside.tool == "getent hosts"
    assert views["nosuch-host.invalid"].inside.ok is False
    assert agreeing.title.endswith(f"inside backend ({pod})")
    nowhere = [f for f in agreeing.findings if f.severity is Severity.CRITICAL]
    assert [f.summary.split(" ")[0] for f in nowhere] == ["nosuch-host.invalid"]
    assert "resolves neither on the ops host nor inside backend" in nowhere[0].summary
    assert not any("postgres" in f.summary for f in agreeing.findings)
    assert SECRET not in _rendered(agreeing)

    # Cut off by the network, with bash only: TCP through /dev/tcp fails, DNS has no tool at all.
    annotate(**{EXEC_PATH_ANNOTATION: _tools(tmp_path / "bash-image", "bash", "sleep", "kill")})
    annotate(**{EXEC_NETWORK_ANNOTATION: "none"})
    cut_off = d.network_from_backend(settings)
    views = _comparisons(cut_off)
    assert views["redis"].inside.tool == "bash /dev/tcp"
    assert views["redis"].inside.ok is False
    assert "unreachable" in views["redis"].inside.detail
    summaries = [f.summary for f in cut_off.findings]
    assert any(s.startswith(f"redis at {urlsplit(REDIS_BASE_URL).hostname}") for s in summaries)
    assert any("DNS resolution could not be checked inside backend" in s for s in summaries)

    # A command the image lacks, as the kubelet reports it (no exit code, a message).
    missing = get_runtime(settings).exec("backend", ["nc", "-z", "127.0.0.1", str(DIAG_CLOSED_PORT)], 10)
    assert missing.exit_code == EXIT_NOT_FOUND
    assert "executable file not found" in missing.stderr
