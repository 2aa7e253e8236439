"""Job listing, retry, clean and stalled-job detection on the real Redis, with real BullMQ workers."""

from __future__ import annotations

import asyncio
import time

import pytest
from bullmq import Queue, Worker
from pydantic import SecretStr

from tasks import queues
from tasks.errors import ParameterError
from tasks.settings import QueueSettings, RedisSettings
from tests.fixtures.diag_services import (
    TEST_QUEUE,
    add_jobs,
    counts,
    make_failed_jobs,
    run_worker,
    succeeding_processor,
)

QUEUE = TEST_QUEUE


def settings(url: str) -> tuple[RedisSettings, QueueSettings]:
    return RedisSettings(url=SecretStr(url)), QueueSettings(names=[QUEUE, "ops-test-other"])


def test_list_jobs_filters_by_reason_and_age(redis_db: str) -> None:
    rs, qs = settings(redis_db)
    ids = make_failed_jobs(redis_db)

    everything = queues.list_jobs(rs, qs, queues.job_filter(qs, state="failed"))
    assert sorted(j.id for j in everything) == sorted([ids[1], ids[3], ids[4]])
    assert all(j.queue == QUEUE and j.state == "failed" for j in everything)
    upstream = queues.list_jobs(
        rs, qs, queues.job_filter(qs, state="failed", reason_pattern=r"upstream 50\d")
    )
    assert sorted(j.id for j in upstream) == sorted([ids[1], ids[3]])
    assert all("upstream 503" in (j.failed_reason or "") for j in upstream)

    # Age: the jobs just failed, so none is older than a minute and all are newer than one.
    assert queues.list_jobs(rs, qs, queues.job_filter(qs, state="failed", older_than_seconds=60)) == []
    recent = queues.list_jobs(rs, qs, queues.job_filter(qs, state="failed", newer_than_seconds=60))
    assert len(recent) == 3
    limited = queues.list_jobs(rs, qs, queues.job_filter(qs, state="failed", limit=2))
    assert len(limited) == 2
    completed = queues.list_jobs(rs, qs, queues.job_filter(qs, state="completed"))
    assert sorted(j.id for j in completed) == sorted([ids[0], ids[2]])


def test_retry_dry_run_changes_nothing_then_retry_and_complete(redis_db: str) -> None:
    rs, qs = settings(redis_db)
    ids = make_failed_jobs(redis_db)
    before = asyncio.run(counts(redis_db))
    selection = queues.job_filter(qs, state="failed", reason_pattern="upstream")
    plan = queues.plan_job_operation(rs, qs, "retry", selection)
    assert sorted(j.id for j in plan.jobs) == sorted([ids[1], ids[3]])

    dry = queues.apply_job_plan(rs, qs, plan, confirm=False)
    assert dry.dry_run
    assert dry.changed == 0
    assert dry.planned == 2
    assert sorted(c.id for c in dry.jobs) == sorted([ids[1], ids[3]])
    assert {c.outcome for c in dry.jobs} == {"would retry"}
    assert asyncio.run(counts(redis_db)) == before

    # One job per batch at 5 jobs/s: the second batch waits for the rate limit.
    record = queues.apply_job_plan(rs, qs, plan, confirm=True, batch_size=1, rate_per_second=5)
    assert (record.changed, record.skipped, record.batches) == (2, 0, 2)
    assert record.duration_seconds >= 0.15
    after = asyncio.run(counts(redis_db))
    assert after["failed"] == 1
    assert after["waiting"] == 2

    # The same plan again touches nothing: the jobs left the failed set.
    again = queues.apply_job_plan(rs, qs, plan, confirm=True)
    assert again.changed == 0
    assert again.skipped == 2
    assert asyncio.run(counts(redis_db)) == after

    # The worker, now healthy, completes the retried jobs; the unmatched failure stays failed.
    final = asyncio.run(run_worker(redis_db, succeeding_processor, lambda c: c["completed"] == 4))
    assert final["failed"] == 1
    assert final["waiting"] == 0
    remaining = queues.list_jobs(rs, qs, queues.job_filter(qs, state="failed"))
    assert [j.id for j in remaining] == [ids[4]]


def test_clean_removes_only_jobs_older_than_the_cutoff(redis_db: str) -> None:
    rs, qs = settings(redis_db)
    old_ids = asyncio.run(add_jobs(redis_db, [{"n": i} for i in range(3)]))
    asyncio.run(run_worker(redis_db, succeeding_processor, lambda c: c["completed"] == 3))
    time.sleep(1.2)
    new_ids = asyncio.run(add_jobs(redis_db, [{"n": i} for i in range(3, 5)]))
    asyncio.run(run_worker(redis_db, succeeding_processor, lambda c: c["completed"] == 5))

    plan = queues.plan_job_operation(
        rs, qs, "clean", queues.job_filter(qs, state="completed", older_than_seconds=1.0)
    )
    assert sorted(j.id for j in plan.jobs) == sorted(old_ids)
    dry = queues.apply_job_plan(rs, qs, plan, confirm=False)
    assert dry.changed == 0
    assert {c.outcome for c in dry.jobs} == {"would remove"}
    assert asyncio.run(counts(redis_db))["completed"] == 5

    record = queues.apply_job_plan(rs, qs, plan, confirm=True)
    assert record.changed == 3
    assert record.skipped == 0
    assert asyncio.run(counts(redis_db))["completed"] == 2
    left = queues.list_jobs(rs, qs, queues.job_filter(qs, state="completed"))
    assert sorted(j.id for j in left) == sorted(new_ids)

    async def job_exists(job_id: str) -> bool:
        q = Queue(QUEUE, {"connection": redis_db})
        try:
            return await q.getJob(job_id) is not None
        finally:
            await q.close()

    assert not any(asyncio.run(job_exists(i)) for i in old_ids)


def test_stalled_jobs_are_active_jobs_without_a_lock(redis_db: str) -> None:
    rs, qs = settings(redis_db)
    asyncio.run(add_jobs(redis_db, [{"n": 0}, {"n": 1}]))

    async def scenario() -> tuple[list[queues.StalledJob], str, str]:
        # Two workers take one job each and never finish: one with a short lock and no lock renewal
        # (a crashed worker), one whose lock is still valid (a slow but live worker).
        crashed = Worker(
            QUEUE, succeeding_processor, {"connection": redis_db, "autorun": False, "lockDuration": 300}
        )
        slow = Worker(
            QUEUE, succeeding_processor, {"connection": redis_db, "autorun": False, "lockDuration": 60000}
        )
        try:
            lost = await crashed.getNextJob("crashed-token")
            held = await slow.getNextJob("slow-token")
            assert lost is not None
            assert held is not None
            await asyncio.sleep(0.6)
            return await asyncio.to_thread(queues.stalled_jobs, rs, qs), str(lost.id), str(held.id)
        finally:
            await crashed.close(force=True)
            await slow.close(force=True)

    stalled, lost_id, _held_id = asyncio.run(scenario())
    assert [s.id for s in stalled] == [lost_id]
    assert stalled[0].queue == QUEUE
    assert stalled[0].active_for_seconds is not None
    assert stalled[0].active_for_seconds >= 0.5
    assert asyncio.run(counts(redis_db))["active"] == 2


def test_bad_selection_fails_before_reading(redis_db: str) -> None:
    rs, qs = settings(redis_db)
    with pytest.raises(ParameterError, match="not configured"):
        queues.job_filter(qs, state="failed", queues=["nope"])
    with pytest.raises(ParameterError, match="regular expression"):
        queues.job_filter(qs, state="failed", reason_pattern="(unclosed")
    with pytest.raises(ParameterError, match="unknown job state"):
        queues.job_filter(qs, state="stuck")
    with pytest.raises(ParameterError, match="newer_than"):
        queues.job_filter(qs, state="failed", older_than_seconds=60, newer_than_seconds=30)
    # Retry works on failed jobs only; clean never on active ones.
    with pytest.raises(ParameterError, match="retry works on failed"):
        queues.plan_job_operation(rs, qs, "retry", queues.job_filter(qs, state="completed"))
    with pytest.raises(ParameterError, match="clean works on"):
        queues.plan_job_operation(rs, qs, "clean", queues.job_filter(qs, state="active"))
    plan = queues.plan_job_operation(rs, qs, "retry", queues.job_filter(qs, state="failed"))
    with pytest.raises(ParameterError, match="batch_size"):
        queues.apply_job_plan(rs, qs, plan, confirm=True, batch_size=0)
