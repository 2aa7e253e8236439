"""The Kubernetes runtime against a real cluster, when one is configured (skipped otherwise).

Set S2M_OPS_TEST_KUBECONFIG (and optionally S2M_OPS_TEST_KUBE_CONTEXT, S2M_OPS_TEST_KUBE_NAMESPACE,
S2M_OPS_TEST_KUBE_SERVICES as a JSON list) to a cluster whose namespace runs the app's Deployments. The
test only reads: statuses, ReplicaSet history, resource usage (the metrics API when installed).
"""

from __future__ import annotations

import os

import pytest

from tasks.kubernetes import KubernetesRuntime
from tasks.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.real_cluster]

KUBECONFIG = os.environ.get("S2M_OPS_TEST_KUBECONFIG")


@pytest.mark.skipif(not KUBECONFIG, reason="no real cluster configured (set S2M_OPS_TEST_KUBECONFIG)")
def test_reads_deployments_history_and_usage_of_a_real_cluster():
    runtime_section = {
        "kind": "kubernetes",
        "kubernetes": {
            "kubeconfig": KUBECONFIG,
            "context": os.environ.get("S2M_OPS_TEST_KUBE_CONTEXT"),
            "namespace": os.environ.get("S2M_OPS_TEST_KUBE_NAMESPACE", "swagger2mcp"),
        },
    }
    if os.environ.get("S2M_OPS_TEST_KUBE_SERVICES"):
        import json

        runtime_section["services"] = json.loads(os.environ["S2M_OPS_TEST_KUBE_SERVICES"])
    runtime = KubernetesRuntime(load_settings(runtime=runtime_section))
    statuses = runtime.list_services()
    assert statuses
    present = [s for s in statuses if s.state != "missing"]
    assert present, f"none of the services exists in the namespace: {statuses}"
    for status in present:
        history = runtime.history(status.name)
        assert history, f"{status.name} has no ReplicaSet revisions"
        assert sum(r.current for r in history) == 1
    usage = runtime.resource_usage()
    assert {u.name for u in usage} == {s.name for s in statuses}
