"""Diagnose's service evidence through a real Runtime implementation: the Kubernetes runtime against
the kmock API emulator (Deployments, pods, pod logs; no metrics API)."""

from __future__ import annotations

from typing import Any

from tasks import diagnose as d
from tasks.diagnose import Severity
from tasks.settings import KubernetesRuntimeSettings, OpsSettings, RuntimeSettings
from tests.fixtures.kube import LOG_ANNOTATION


def test_services_status_logs_and_usage_through_the_runtime(kube_stack: Any) -> None:
    from kubernetes import client

    core = client.CoreV1Api(kube_stack.api())
    backend_pod = next(
        p
        for p in core.list_namespaced_pod(kube_stack.namespace).items
        if p.metadata.labels.get("app") == "backend"
    )
    log = "listening on 3000\nFATAL ERROR: Reached heap limit - JavaScript heap out of memory\n"
    core.patch_namespaced_pod(
        backend_pod.metadata.name, kube_stack.namespace, {"metadata": {"annotations": {LOG_ANNOTATION: log}}}
    )
    settings = OpsSettings(
        runtime=RuntimeSettings(
            kind="kubernetes",
            services=["backend", "worker", "nginx"],
            kubernetes=KubernetesRuntimeSettings(api_url=kube_stack.url, namespace=kube_stack.namespace),
        )
    )
    diagnosis = d.services(settings)
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.ServicesEvidence)
    assert evidence.runtime == "kubernetes"
    rows = {r["service"]: r for r in evidence.rows()}
    assert rows["backend"]["ready"] == "1/1"
    assert rows["worker"]["ready"] == "1/1"
    assert rows["backend"]["log_matches"] == 1
    tails = {t.service: t for t in evidence.logs}
    assert "heap out of memory" in tails["backend"].matches[0]
    assert tails["worker"].matches == ()
    assert "nginx" not in tails  # missing: no logs to read
    findings = {f.summary: f for f in diagnosis.findings}
    missing = next(f for s, f in findings.items() if "nginx is not running at all" in s)
    assert missing.severity is Severity.CRITICAL
    assert missing.flow == d.FLOW_OUTAGE
    memory = next(f for s, f in findings.items() if "log lines of backend" in s)
    assert memory.runbook == d.RB_MEMORY
    assert not any("backend is" in s for s in findings)  # backend itself is ready
    # No metrics API in the emulator: usage is reported unavailable, not invented.
    assert all(u.cpu_percent is None for u in evidence.usage)
