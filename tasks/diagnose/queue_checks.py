"""BullMQ queue checks: jobs by state, stalled active jobs, the newest failed jobs' reasons and the
connected workers (runbook Common Issues 3), read with BullMQ's own scripts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasks import queues
from tasks.diagnose.model import (
    FLOW_RESTART,
    FLOW_RETRY,
    RB_WORKER,
    Diagnosis,
    Finding,
    Severity,
)
from tasks.diagnose.redis_checks import unreachable_redis
from tasks.secrets import one_line
from tasks.settings import DiagnoseSettings, OpsSettings, RedisSettings

CHECK = "queues"


@dataclass(frozen=True)
class QueuesEvidence:
    """Jobs by state per queue, stalled active jobs, the newest failed jobs, connected workers."""

    counts: tuple[queues.QueueCounts, ...]
    workers: dict[str, int | None]
    stalled: tuple[queues.StalledJob, ...]
    failed: tuple[queues.JobInfo, ...]
    read_at_ms: int

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"queue": q.name, **q.counts, "is_paused": q.is_paused, "workers": self.workers.get(q.name)}
            for q in self.counts
        ]

    def failed_rows(self) -> list[dict[str, Any]]:
        return [job.as_row(self.read_at_ms) for job in self.failed]

    def stalled_rows(self) -> list[dict[str, Any]]:
        return [job.as_row() for job in self.stalled]


async def _workers(redis_settings: RedisSettings, prefix: str, names: Sequence[str]) -> dict[str, int | None]:
    from bullmq import Queue

    conn = queues.async_client(redis_settings)
    try:
        out: dict[str, int | None] = {}
        for name in names:
            try:
                workers = await Queue(name, {"connection": conn, "prefix": prefix}).get_workers()
            except Exception:
                # CLIENT LIST may be disabled (managed Redis): the count is unknown, not zero.
                out[name] = None
                continue
            unsupported = any(w.get("name") == "CLIENT LIST not supported" for w in workers)
            out[name] = None if unsupported else len(workers)
        return out
    finally:
        await conn.aclose()


def _stalled_finding(stalled: Sequence[queues.StalledJob]) -> Finding:
    by_queue = ", ".join(
        f"{name} {sum(1 for j in stalled if j.queue == name)}"
        for name in dict.fromkeys(j.queue for j in stalled)
    )
    return Finding(
        CHECK,
        Severity.CRITICAL,
        f"{len(stalled)} jobs stuck in active with an expired lock ({by_queue}): no worker owns them",
        RB_WORKER,
        "If jobs are stuck in active the worker may have crashed: restart the worker, it picks them up",
        FLOW_RESTART,
    )


def _newest_reasons(queue: str, failed: Sequence[queues.JobInfo]) -> str:
    """The three most frequent reasons among the newest failed jobs of ``queue``."""
    reasons: dict[str, int] = {}
    for job in failed:
        if job.queue == queue:
            key = one_line(job.failed_reason or "(no reason)", 80)
            reasons[key] = reasons.get(key, 0) + 1
    return "; ".join(f"{reason} (x{n})" for reason, n in sorted(reasons.items(), key=lambda i: -i[1])[:3])


def _one_queue_findings(
    q: queues.QueueCounts, workers: int | None, failed: Sequence[queues.JobInfo], limits: DiagnoseSettings
) -> list[Finding]:
    """Paused, waiting with no worker (or too many waiting), failed jobs: in that order."""
    findings: list[Finding] = []
    if q.is_paused:
        findings.append(
            Finding(
                CHECK,
                Severity.WARNING,
                f"queue {q.name} is paused ({q['paused'] + q['waiting']} jobs held)",
                RB_WORKER,
                "Resume the queue once the reason it was paused is resolved",
                None,
            )
        )
    if q["waiting"] > 0 and q["active"] == 0 and workers == 0 and not q.is_paused:
        findings.append(
            Finding(
                CHECK,
                Severity.CRITICAL,
                f"queue {q.name}: {q['waiting']} jobs waiting, none active, no worker connected",
                RB_WORKER,
                "Check the worker is running and restart it (docker compose restart worker)",
                FLOW_RESTART,
            )
        )
    elif q["waiting"] > limits.waiting_jobs_warn:
        findings.append(
            Finding(
                CHECK,
                Severity.WARNING,
                f"queue {q.name}: {q['waiting']} jobs waiting (over {limits.waiting_jobs_warn}),"
                f" {q['active']} active, workers {'unknown' if workers is None else workers}",
                RB_WORKER,
                "Check the worker's logs for errors; restart the worker",
                FLOW_RESTART,
            )
        )
    if q["failed"] > 0:
        shown = _newest_reasons(q.name, failed)
        findings.append(
            Finding(
                CHECK,
                Severity.WARNING,
                f"queue {q.name}: {q['failed']} failed jobs"
                + (f"; newest reasons: {shown}" if shown else ""),
                RB_WORKER,
                "Check the failed jobs' reasons; once the cause is fixed, retry them (dry run first)",
                FLOW_RETRY,
            )
        )
    return findings


def queue_findings(evidence: QueuesEvidence, limits: DiagnoseSettings) -> list[Finding]:
    """Findings from the queue evidence (a pure function of it)."""
    findings: list[Finding] = []
    if evidence.stalled:
        findings.append(_stalled_finding(evidence.stalled))
    for q in evidence.counts:
        findings += _one_queue_findings(q, evidence.workers.get(q.name), evidence.failed, limits)
    if not findings:
        totals = {s: sum(q[s] for q in evidence.counts) for s in ("waiting", "active", "failed")}
        findings.append(
            Finding(
                CHECK,
                Severity.OK,
                f"{totals['waiting']} waiting, {totals['active']} active, {totals['failed']} failed",
                RB_WORKER,
            )
        )
    return findings


def queue_states(settings: OpsSettings) -> Diagnosis:
    """Runbook 3 "Check Redis queue": jobs by state, stalled active jobs, newest failed jobs' reasons.

    Read with BullMQ's own scripts (failed/completed/delayed are sorted sets, not lists).
    """
    check, title = CHECK, "BullMQ queues"
    limits = settings.diagnose
    try:
        counts = queues.queue_counts(settings.redis, settings.queue)
        stalled = queues.stalled_jobs(settings.redis, settings.queue)
        failed: list[queues.JobInfo] = []
        if limits.failed_jobs_shown:
            for name in settings.queue.names:
                selection = queues.job_filter(
                    settings.queue, state="failed", queues=[name], limit=limits.failed_jobs_shown
                )
                failed += queues.list_jobs(settings.redis, settings.queue, selection)
        workers = queues.run_async(_workers(settings.redis, settings.queue.prefix, settings.queue.names))
    except Exception as exc:
        return Diagnosis(check, title, None, (unreachable_redis(check, exc, settings.redis),), error=str(exc))
    evidence = QueuesEvidence(
        counts=tuple(counts),
        workers=workers,
        stalled=tuple(stalled),
        failed=tuple(failed),
        read_at_ms=int(time.time() * 1000),
    )
    return Diagnosis(check, title, evidence, tuple(queue_findings(evidence, limits)))
