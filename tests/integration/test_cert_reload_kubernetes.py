"""Reloading nginx on Kubernetes: a rollout restart through the runtime, against the kmock API emulator."""

from __future__ import annotations

from typing import Any

import pytest

from tasks import certificates
from tasks.settings import OpsSettings

pytestmark = pytest.mark.integration


def test_kubernetes_reload_is_a_rollout_restart(kube_stack: Any) -> None:
    from kubernetes import client

    settings = OpsSettings(
        runtime={
            "kind": "kubernetes",
            "kubernetes": {"api_url": kube_stack.url, "namespace": kube_stack.namespace},
            "ready_timeout_seconds": 30,
            "poll_interval_seconds": 0.2,
        },
        certificates={
            "reload_method": "kubernetes",
            "reload_services": ["backend"],
            "reload_timeout_seconds": 30,
        },
    )

    record = certificates.reload_server(settings)

    assert record.method == "kubernetes"
    assert record.changed
    assert record.commands == (f"kubectl rollout restart deployment/backend -n {kube_stack.namespace}",)
    apps = client.AppsV1Api(kube_stack.api())
    deployment = apps.read_namespaced_deployment("backend", kube_stack.namespace)
    assert "kubectl.kubernetes.io/restartedAt" in (deployment.spec.template.metadata.annotations or {})


def test_kubernetes_reload_of_a_missing_deployment_fails_clearly(kube_stack: Any) -> None:
    settings = OpsSettings(
        runtime={
            "kind": "kubernetes",
            "kubernetes": {"api_url": kube_stack.url, "namespace": kube_stack.namespace},
        },
        certificates={
            "reload_method": "kubernetes",
            "reload_services": ["nginx"],
            "reload_timeout_seconds": 5,
        },
    )
    with pytest.raises(certificates.ReloadFailed, match="rollout restart of nginx failed"):
        certificates.reload_server(settings)
