"""Diagnose's Redis and BullMQ evidence: a private redis-server with a low maxmemory and an evicting
policy, and real jobs failed and stalled by real BullMQ workers on the shared Redis."""

from __future__ import annotations

import asyncio

from bullmq import Worker
from pydantic import SecretStr

from tasks import diagnose as d
from tasks.diagnose import Severity
from tasks.settings import DiagnoseSettings, OpsSettings, QueueSettings, RedisSettings
from tests.fixtures.diag_services import (
    DIAG_CLOSED_PORT,
    TEST_QUEUE,
    DiagRedis,
    add_jobs,
    make_failed_jobs,
    succeeding_processor,
)


def test_low_maxmemory_and_evicting_policy_are_critical(diag_redis: DiagRedis) -> None:
    diagnosis = d.redis_memory(RedisSettings(url=SecretStr(diag_redis.url)), DiagnoseSettings())
    memory = diagnosis.evidence
    assert isinstance(memory, d.RedisMemory)
    assert memory.maxmemory == diag_redis.maxmemory
    assert memory.policy == "allkeys-lru"
    assert memory.evicted_keys > 0
    assert memory.peak >= memory.used > 0
    assert memory.fragmentation_ratio is not None
    assert memory.ratio is not None
    assert memory.ratio > 0.8
    by_text = {f.summary: f for f in diagnosis.findings}
    policy = next(f for s, f in by_text.items() if "maxmemory-policy is 'allkeys-lru'" in s)
    assert policy.severity is Severity.CRITICAL
    assert "keys were already evicted" in policy.summary
    assert "noeviction" in (policy.resolution or "")
    full = next(f for s, f in by_text.items() if "of maxmemory" in s)
    assert full.severity in {Severity.WARNING, Severity.CRITICAL}
    assert full.flow == d.FLOW_CLEAN_JOBS
    assert {r["metric"] for r in diagnosis.rows()} >= {"used_memory", "used_memory_peak", "maxmemory_policy"}


def test_shared_redis_memory_is_fine(redis_db: str) -> None:
    diagnosis = d.redis_memory(RedisSettings(url=SecretStr(redis_db)), DiagnoseSettings())
    assert diagnosis.severity is Severity.OK
    assert "policy noeviction" in diagnosis.findings[0].summary


def test_unreachable_redis_is_critical_and_masked() -> None:
    settings = RedisSettings(url=SecretStr(f"redis://:HiddenPw@127.0.0.1:{DIAG_CLOSED_PORT}/0"))
    diagnosis = d.redis_memory(settings, DiagnoseSettings())
    assert diagnosis.evidence is None
    assert diagnosis.findings[0].severity is Severity.CRITICAL
    assert "HiddenPw" not in diagnosis.findings[0].summary


def test_queue_states_show_failed_reasons_and_stalled_jobs(redis_db: str) -> None:
    settings = OpsSettings(
        redis=RedisSettings(url=SecretStr(redis_db)),
        queue=QueueSettings(names=[TEST_QUEUE]),
        diagnose=DiagnoseSettings(failed_jobs_shown=2),
    )
    ids = make_failed_jobs(redis_db)
    asyncio.run(add_jobs(redis_db, [{"n": 10}]))

    async def take_and_crash() -> None:
        # A worker takes the job and dies without renewing its lock.
        worker = Worker(
            TEST_QUEUE, succeeding_processor, {"connection": redis_db, "autorun": False, "lockDuration": 200}
        )
        try:
            assert await worker.getNextJob("crashed") is not None
            await asyncio.sleep(0.5)
        finally:
            await worker.close(force=True)

    asyncio.run(take_and_crash())
    diagnosis = d.queue_states(settings)
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.QueuesEvidence)
    counts = evidence.counts[0]
    assert (counts["failed"], counts["completed"], counts["active"]) == (3, 2, 1)
    assert len(evidence.stalled) == 1
    assert len(evidence.failed) == 2  # the newest two, as configured
    assert {j.id for j in evidence.failed} <= {ids[1], ids[3], ids[4]}
    severities = {(f.severity, f.flow) for f in diagnosis.findings}
    assert (Severity.CRITICAL, d.FLOW_RESTART) in severities
    assert (Severity.WARNING, d.FLOW_RETRY) in severities
    failed = next(f for f in diagnosis.findings if f.flow == d.FLOW_RETRY)
    assert f"queue {TEST_QUEUE}: 3 failed jobs" in failed.summary
    assert evidence.rows()[0]["failed"] == 3
    assert evidence.failed_rows()[0]["reason"]
