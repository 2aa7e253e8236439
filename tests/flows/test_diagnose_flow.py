"""The diagnose flow under the Prefect test harness, against the real PostgreSQL and Redis, and its
deployment trigger on the health check's unhealthy event."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.events import DeploymentEventTrigger
from prefect.events.schemas.events import Resource

from deployments.serve import DeploymentSpec, to_runner_deployment
from flows.diagnose import diagnose
from tests.fixtures.core import PG_ADMIN_DSN
from tests.fixtures.diag_services import DIAG_CLOSED_PORT, TEST_QUEUE, make_failed_jobs

DIAGNOSE_TRIGGER = {
    "name": "diagnose-on-unhealthy",
    "enabled": True,
    "posture": "Reactive",
    "expect": ["swagger2mcp-ops.health.unhealthy"],
    "match": {"prefect.resource.id": "swagger2mcp-ops.stack.*"},
    "threshold": 1,
    "within": 0,
    "parameters": {"triggered_by": "{{ event.event }} on {{ event.resource.id }}"},
}


async def _artifact(key: str) -> Any:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return max(found, key=lambda a: a.created)


@pytest.mark.usefixtures("prefect_harness")
def test_diagnose_reports_evidence_and_findings(
    ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPS_QUEUE__NAMES", f'["{TEST_QUEUE}"]')
    make_failed_jobs(ops_env["redis_url"])
    (ops_env["tmp"] / "uploads").mkdir()
    conn = psycopg.connect(ops_env["dsn"], application_name="diag-flow-sleeper", autocommit=True)
    pid = conn.info.backend_pid

    def sleep_in_database() -> None:
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30), 'hidden-literal'")

    sleeper = threading.Thread(target=sleep_in_database, daemon=True)
    sleeper.start()
    try:
        time.sleep(1.2)
        state = diagnose(long_query_seconds=1, triggered_by="test", return_state=True)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
        sleeper.join(timeout=10)
        conn.close()
    assert state.is_completed(), state.message
    report = state.result()
    assert report["stack"] == "teststack"
    assert set(report["checks"]) == {
        "postgres-connections",
        "postgres-long-queries",
        "postgres-top-statements",
        "redis-memory",
        "queues",
        "services",
        "disk",
        "uploads-permissions",
        "network",
        "response-times",
        "upload-limits",
        "network-from-backend",
    }
    assert report["checks"]["postgres-long-queries"] == "warning"
    assert report["checks"]["queues"] == "warning"
    flows = {f["flow"] for f in report["findings"]}
    assert "retry-failed-jobs" in flows
    assert report["severity"] == "warning"

    markdown = asyncio.run(_artifact("diagnose-teststack")).data
    assert "# Diagnosis of teststack: **warning**" in markdown
    assert "triggered by test" in markdown
    assert "pg_sleep(?)" in markdown
    assert "hidden-literal" not in markdown
    assert "upstream 503 from crawler" in markdown
    assert "`retry-failed-jobs`" in markdown
    assert "pg_stat_statements is not installed" in markdown
    # No runtime here: the backend's view is missing, said so beside the ops host's.
    assert report["checks"]["network-from-backend"] == "info"
    assert "backend's own view was not taken" in markdown
    table = asyncio.run(_artifact("diagnose-teststack-findings"))
    assert table.type == "table"


@pytest.mark.usefixtures("prefect_harness")
def test_services_down_are_findings_and_fail_only_when_asked(
    ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPS_REDIS__URL", f"redis://:HiddenPw@127.0.0.1:{DIAG_CLOSED_PORT}/0")
    monkeypatch.setenv("OPS_REDIS__SOCKET_TIMEOUT_SECONDS", "1")
    state = diagnose(return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report["severity"] == "critical"
    assert report["checks"]["redis-memory"] == "critical"
    assert report["checks"]["queues"] == "critical"
    assert report["checks"]["network"] == "critical"
    assert report["checks"]["postgres-connections"] == "ok"

    failing = diagnose(fail_on_critical=True, return_state=True)
    assert failing.is_failed()
    assert "critical findings" in (failing.message or "")
    assert "HiddenPw" not in (failing.message or "")
    markdown = asyncio.run(_artifact("diagnose-teststack")).data
    assert "**critical**" in markdown
    assert "HiddenPw" not in markdown
    assert "Restart Redis" in markdown


@pytest.mark.usefixtures("prefect_harness")
def test_bad_parameter_fails_before_any_check(ops_env: dict[str, Any]) -> None:
    state = diagnose(long_query_seconds=-1, return_state=True)
    assert state.is_failed()
    assert "long_query_seconds must be positive" in (state.message or "")


def test_deployment_trigger_on_the_health_event_is_accepted() -> None:
    spec = DeploymentSpec(
        name="on-unhealthy",
        entrypoint="flows/diagnose.py:diagnose",
        tags=("diagnose",),
        concurrency_limit={"limit": 1, "collision_strategy": "CANCEL_NEW"},
        triggers=(DIAGNOSE_TRIGGER,),
    )
    deployment = to_runner_deployment(spec)
    assert deployment.name == "on-unhealthy"
    (trigger,) = deployment.triggers
    assert isinstance(trigger, DeploymentEventTrigger)
    assert trigger.expect == {"swagger2mcp-ops.health.unhealthy"}
    assert trigger.posture.value == "Reactive"
    assert trigger.threshold == 1
    assert trigger.within.total_seconds() == 0
    assert trigger.match.root == {"prefect.resource.id": "swagger2mcp-ops.stack.*"}
    # Templated parameters name real parameters of the flow (a typo would be dropped silently).
    assert set(trigger.parameters or {}) <= set(diagnose.parameters.properties)
    # The resource of every event the health flow emits matches; other stacks' prefixes do not.
    assert trigger.match.matches(
        Resource({"prefect.resource.id": "swagger2mcp-ops.stack.teststack.check.redis"})
    )
    assert not trigger.match.matches(Resource({"prefect.resource.id": "prefect.flow-run.1234"}))


@pytest.mark.usefixtures("prefect_harness")
def test_unhealthy_health_check_starts_diagnose_through_the_trigger(
    ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events.worker import EventsWorker

    from flows.health import health_check

    spec = DeploymentSpec(
        name="on-unhealthy", entrypoint="flows/diagnose.py:diagnose", triggers=(DIAGNOSE_TRIGGER,)
    )
    deployment_id = to_runner_deployment(spec).apply()

    async def runs() -> list[Any]:
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )

    async def remove() -> None:
        async with get_client() as client:
            await client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
            await client.delete_deployment(deployment_id)

    try:
        monkeypatch.setenv("OPS_REDIS__URL", f"redis://127.0.0.1:{DIAG_CLOSED_PORT}/0")
        health = health_check(fail_when_unhealthy=False, return_state=True)
        assert health.result()["status"] == "unhealthy"
        EventsWorker.drain_all()
        deadline = time.monotonic() + 60
        started: list[Any] = []
        while not started and time.monotonic() < deadline:
            time.sleep(0.5)
            started = asyncio.run(runs())
        assert started, "the unhealthy event did not start a diagnose run"
        triggered_by = {run.parameters.get("triggered_by") for run in started}
        # One event per failing check (redis, and the queue check that reads Redis): each starts a run.
        prefix = "swagger2mcp-ops.health.unhealthy on swagger2mcp-ops.stack.teststack.check."
        triggered_checks = {value.removeprefix(prefix) for value in triggered_by if value.startswith(prefix)}
        assert all(value.startswith(prefix) for value in triggered_by)
        assert triggered_checks
        assert triggered_checks <= {"redis", "queue"}
    finally:
        asyncio.run(remove())
