"""The health-check flow under the Prefect test harness, against the real PostgreSQL and Redis."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.health import health_check
from tests.fixtures.servers import CLOSED_PORT

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def _artifact(key: str) -> Any:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return max(found, key=lambda a: a.created)


def test_healthy_run_completes_with_runbook_report(ops_env: dict[str, Any]) -> None:
    state = health_check(return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report["status"] == "healthy"
    assert set(report["checks"]) == {"postgres", "redis", "queue"}
    assert report["checks"]["queue"]["waiting"] == 0

    import asyncio

    markdown = asyncio.run(_artifact("health-teststack"))
    assert "Health of teststack: **healthy**" in markdown.data
    table = asyncio.run(_artifact("health-teststack-checks"))
    assert table.type == "table"


def test_unhealthy_run_fails_and_still_reports(
    ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPS_REDIS__URL", f"redis://:HiddenPw@127.0.0.1:{CLOSED_PORT}/0")
    state = health_check(return_state=True)
    assert state.is_failed()
    assert "teststack is unhealthy" in (state.message or "")
    assert "redis" in (state.message or "")
    assert "HiddenPw" not in (state.message or "")

    import asyncio

    markdown = asyncio.run(_artifact("health-teststack"))
    assert "**unhealthy**" in markdown.data
    assert "HiddenPw" not in markdown.data
    assert "diagnose" in markdown.data


def test_unhealthy_but_not_failing_when_asked(
    ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPS_POSTGRES__DSN", f"postgresql://postgres@127.0.0.1:{CLOSED_PORT}/x")
    state = health_check(fail_when_unhealthy=False, return_state=True)
    assert state.is_completed()
    report = state.result()
    assert report["status"] == "unhealthy"
    assert report["checks"]["postgres"]["status"] == "unhealthy"
    assert report["checks"]["redis"]["status"] == "healthy"


def test_bad_setting_fails_before_any_check(ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_HEALTH__TIMEOUT_SECONDS", "-3")
    state = health_check(return_state=True)
    assert state.is_failed()
    assert "health.timeout_seconds" in (state.message or "")
    assert "OPS_HEALTH__TIMEOUT_SECONDS" in (state.message or "")
