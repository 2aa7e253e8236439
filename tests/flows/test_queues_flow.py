"""The retry-failed-jobs and clean-jobs flows under the Prefect test harness: jobs failed by a real
BullMQ worker, retried by the flow, completed by the worker; old jobs cleaned; dry runs change nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.queues import clean_jobs, retry_failed_jobs
from tests.fixtures.diag_services import (
    TEST_QUEUE,
    counts,
    make_failed_jobs,
    run_worker,
    succeeding_processor,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def _artifact(key: str) -> Any:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return max(found, key=lambda a: a.created)


@pytest.fixture
def queue_env(ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("OPS_QUEUE__NAMES", f'["{TEST_QUEUE}", "ops-test-idle"]')
    return ops_env


def test_retry_dry_run_then_apply_then_worker_completes(queue_env: dict[str, Any]) -> None:
    url = queue_env["redis_url"]
    ids = make_failed_jobs(url)
    before = asyncio.run(counts(url))

    dry = retry_failed_jobs(reason_pattern="upstream 503", return_state=True)
    assert dry.is_completed(), dry.message
    result = dry.result()
    assert result["dry_run"] is True
    assert (result["planned"], result["changed"]) == (2, 0)
    assert asyncio.run(counts(url)) == before
    markdown = asyncio.run(_artifact("retry-failed-jobs-teststack")).data
    assert "dry run, 2 jobs would be retried" in markdown
    assert ids[1] in markdown
    assert ids[3] in markdown
    assert "dry_run=false" in markdown
    table = asyncio.run(_artifact("retry-failed-jobs-teststack-jobs"))
    assert table.type == "table"

    applied = retry_failed_jobs(reason_pattern="upstream 503", dry_run=False, batch_size=1, return_state=True)
    assert applied.is_completed(), applied.message
    record = applied.result()
    assert (record["planned"], record["changed"], record["batches"]) == (2, 2, 2)
    assert asyncio.run(counts(url))["waiting"] == 2
    final = asyncio.run(run_worker(url, succeeding_processor, lambda c: c["completed"] == 4))
    assert final["failed"] == 1

    again = retry_failed_jobs(reason_pattern="upstream 503", dry_run=False, return_state=True)
    assert again.result()["planned"] == 0
    assert "No job matches" in asyncio.run(_artifact("retry-failed-jobs-teststack")).data


def test_clean_jobs_dry_run_then_apply(queue_env: dict[str, Any]) -> None:
    url = queue_env["redis_url"]
    make_failed_jobs(url)
    dry = clean_jobs(state="completed", all=True, return_state=True)
    assert dry.result()["planned"] == 2
    assert asyncio.run(counts(url))["completed"] == 2
    # Nothing finished an hour ago yet.
    assert (
        clean_jobs(state="failed", older_than_hours=1, dry_run=False, return_state=True).result()["changed"]
        == 0
    )
    applied = clean_jobs(state="failed", all=True, reason_pattern="invalid payload", dry_run=False)
    assert applied["changed"] == 1
    after = asyncio.run(counts(url))
    assert (after["failed"], after["completed"]) == (2, 2)
    assert "1 of 1 jobs removed" in asyncio.run(_artifact("clean-jobs-teststack")).data


def test_bad_parameters_fail_before_anything(queue_env: dict[str, Any]) -> None:
    url = queue_env["redis_url"]
    make_failed_jobs(url)
    before = asyncio.run(counts(url))
    unknown = retry_failed_jobs(queues=["nope"], dry_run=False, return_state=True)
    assert unknown.is_failed()
    assert "not configured" in (unknown.message or "")
    report = asyncio.run(_artifact("retry-failed-jobs-teststack")).data
    assert "failed before any job was changed" in report
    assert "not configured" in report
    pattern = retry_failed_jobs(reason_pattern="(", dry_run=False, return_state=True)
    assert pattern.is_failed()
    assert "not a regular expression" in (pattern.message or "")
    state = clean_jobs(state="active", dry_run=False, return_state=True)  # type: ignore[arg-type]
    assert state.is_failed()
    assert asyncio.run(counts(url)) == before


def test_clean_jobs_under_an_hour_needs_all(queue_env: dict[str, Any]) -> None:
    """older_than_hours=0 would select every completed job: it needs all=true, said before anything."""
    url = queue_env["redis_url"]
    make_failed_jobs(url)
    before = asyncio.run(counts(url))
    for hours in (0, 0.5):
        state = clean_jobs(state="completed", older_than_hours=hours, dry_run=False, return_state=True)
        assert state.is_failed(), hours
        assert "all=true" in (state.message or "")
        assert "older_than_hours must be at least 1" in (state.message or "")
    assert "all=true" in asyncio.run(_artifact("clean-jobs-teststack")).data
    both = clean_jobs(state="completed", older_than_hours=24, all=True, dry_run=False, return_state=True)
    assert both.is_failed()
    assert "not both" in (both.message or "")
    assert asyncio.run(counts(url)) == before

    everything = clean_jobs(state="completed", all=True, dry_run=False)
    assert (everything["planned"], everything["changed"]) == (2, 2)
    assert asyncio.run(counts(url))["completed"] == 0
    assert (
        "state completed; queues ops-test-jobs, ops-test-idle; any age"
        in asyncio.run(_artifact("clean-jobs-teststack")).data
    )
