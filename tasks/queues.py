"""BullMQ queues, read and operated on through the official ``bullmq`` package, so the Lua scripts are
the same ones the Node worker runs.

Note: in BullMQ ``failed``, ``completed``, ``delayed`` and ``prioritized`` are sorted sets, not lists:
``LLEN bull:default:failed`` (as some runbooks suggest) answers with an error, not a count.

Reading: counts by state, jobs selected by a :class:`JobFilter` (state, queue, failure reason, age),
stalled active jobs. Changing: :func:`plan_job_operation` computes the exact jobs a retry or clean
touches, and :func:`apply_job_plan` is the one confirm-gated function that changes them (without
``confirm`` it reports the same jobs and changes nothing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from bullmq import Job, Queue

from tasks import redisdb
from tasks.errors import ParameterError
from tasks.ops_task import ops_task
from tasks.settings import QueueSettings, RedisSettings

T = TypeVar("T")

# The states BullMQ keeps jobs in, in the order reports show them.
JOB_STATES: tuple[str, ...] = (
    "waiting",
    "active",
    "delayed",
    "prioritized",
    "waiting-children",
    "paused",
    "failed",
    "completed",
)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, also when this thread already has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def async_client(settings: RedisSettings, *, db: int | None = None) -> aioredis.Redis:
    """An asyncio client with timeouts and no retries, for ``bullmq.Queue(connection=...)``.

    bullmq's own default connection retries for minutes when Redis is down; a check must not.
    """
    options = redisdb.client_options(settings, db=db)
    return aioredis.Redis.from_url(settings.url.get_secret_value(), decode_responses=True, **options)


@dataclass(frozen=True)
class QueueCounts:
    """Exact job counts of one BullMQ queue, by state."""

    name: str
    counts: dict[str, int]
    is_paused: bool

    def __getitem__(self, state: str) -> int:
        return self.counts.get(state, 0)


async def _queue_counts(redis_settings: RedisSettings, queue_settings: QueueSettings) -> list[QueueCounts]:
    conn = async_client(redis_settings)
    try:
        results = []
        for name in queue_settings.names:
            queue = Queue(name, {"connection": conn, "prefix": queue_settings.prefix})
            counts = await queue.getJobCounts(*JOB_STATES)
            paused = bool(await queue.isPaused())
            results.append(
                QueueCounts(
                    name=name, counts={s: int(counts.get(s, 0)) for s in JOB_STATES}, is_paused=paused
                )
            )
        return results
    finally:
        await conn.aclose()


def queue_counts(redis_settings: RedisSettings, queue_settings: QueueSettings) -> list[QueueCounts]:
    """Job counts by state for every configured queue, read with BullMQ's own ``getCounts`` script.

    Raises:
        redis.RedisError: Redis cannot be reached or refused the script.
    """
    return run_async(_queue_counts(redis_settings, queue_settings))


# --- Job listing, stalled jobs, and the one confirm-gated job operation --------------------------------

# States a job operation may select from: retry takes failed jobs back to waiting; clean removes
# finished jobs. Active, waiting and delayed jobs are never touched here.
OPERATION_STATES: dict[str, tuple[str, ...]] = {"retry": ("failed",), "clean": ("completed", "failed")}
_PAGE = 500


@dataclass(frozen=True)
class JobInfo:
    """One BullMQ job as reports show it (data is not copied: it may hold user content)."""

    queue: str
    id: str
    name: str
    state: str
    timestamp_ms: int
    processed_on_ms: int | None
    finished_on_ms: int | None
    attempts_made: int
    failed_reason: str | None

    @property
    def reference_ms(self) -> int:
        """When the job reached its state: finished jobs by ``finishedOn``, others by creation."""
        return self.finished_on_ms or self.processed_on_ms or self.timestamp_ms

    def age_seconds(self, now_ms: int) -> float:
        return max(0.0, (now_ms - self.reference_ms) / 1000)

    def as_row(self, now_ms: int) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "age_s": round(self.age_seconds(now_ms), 1),
            "attempts": self.attempts_made,
            "reason": _short(self.failed_reason),
        }


def _short(text: str | None, limit: int = 200) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class JobFilter:
    """Which jobs an operation selects. Built by :func:`job_filter`, which validates it."""

    state: str
    queues: tuple[str, ...]
    reason_pattern: str | None = None
    older_than_seconds: float = 0.0
    newer_than_seconds: float | None = None
    limit: int | None = None

    def matches(self, job: JobInfo, now_ms: int) -> bool:
        age = job.age_seconds(now_ms)
        if age < self.older_than_seconds:
            return False
        if self.newer_than_seconds is not None and age > self.newer_than_seconds:
            return False
        if self.reason_pattern is not None:
            return re.search(self.reason_pattern, job.failed_reason or "") is not None
        return True

    def describe(self) -> str:
        parts = [f"state {self.state}", f"queues {', '.join(self.queues)}"]
        if self.reason_pattern is not None:
            parts.append(f"reason matching /{self.reason_pattern}/")
        if self.older_than_seconds:
            parts.append(f"older than {_duration(self.older_than_seconds)}")
        if self.newer_than_seconds is not None:
            parts.append(f"newer than {_duration(self.newer_than_seconds)}")
        if not self.older_than_seconds and self.newer_than_seconds is None:
            parts.append("any age")
        if self.limit is not None:
            parts.append(f"at most {self.limit}")
        return "; ".join(parts)


def _duration(seconds: float) -> str:
    if seconds >= 86400 and seconds % 3600 == 0:
        return f"{seconds / 86400:g} d"
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def job_filter(
    queue_settings: QueueSettings,
    *,
    state: str,
    queues: Sequence[str] | None = None,
    reason_pattern: str | None = None,
    older_than_seconds: float = 0.0,
    newer_than_seconds: float | None = None,
    limit: int | None = None,
) -> JobFilter:
    """A validated :class:`JobFilter`.

    Args:
        queue_settings: the configured queues; ``queues`` must be among them (all when None).
        state: the BullMQ state to select from (``failed``, ``completed``, ...).
        reason_pattern: regular expression searched in the failure reason.
        older_than_seconds: only jobs that reached their state at least this long ago.
        newer_than_seconds: only jobs that reached their state at most this long ago.
        limit: at most this many jobs in all (newest first).

    Raises:
        ParameterError: an unknown queue or state, a bad regular expression, a negative age, a limit
            below 1; nothing was read or changed.
    """
    if state not in JOB_STATES:
        raise ParameterError(f"unknown job state {state!r}; use one of {', '.join(JOB_STATES)}")
    chosen = tuple(queues) if queues else tuple(queue_settings.names)
    unknown = [q for q in chosen if q not in queue_settings.names]
    if unknown:
        raise ParameterError(
            f"queue(s) {', '.join(unknown)} are not configured (OPS_QUEUE__NAMES is"
            f" {list(queue_settings.names)}); pick from those or add them to the settings"
        )
    if reason_pattern is not None:
        try:
            re.compile(reason_pattern)
        except re.error as exc:
            raise ParameterError(
                f"reason_pattern {reason_pattern!r} is not a regular expression: {exc}"
            ) from None
    if older_than_seconds < 0 or (newer_than_seconds is not None and newer_than_seconds <= 0):
        raise ParameterError("ages must be positive (older_than >= 0, newer_than > 0)")
    if newer_than_seconds is not None and newer_than_seconds <= older_than_seconds:
        raise ParameterError("newer_than must be larger than older_than, or no job can match")
    if limit is not None and limit < 1:
        raise ParameterError("limit must be at least 1 (or None for no limit)")
    return JobFilter(
        state=state,
        queues=chosen,
        reason_pattern=reason_pattern,
        older_than_seconds=float(older_than_seconds),
        newer_than_seconds=None if newer_than_seconds is None else float(newer_than_seconds),
        limit=limit,
    )


def _job_info(queue_name: str, state: str, job: Job) -> JobInfo:
    return JobInfo(
        queue=queue_name,
        id=str(job.id),
        name=str(job.name),
        state=state,
        timestamp_ms=int(job.timestamp or 0),
        processed_on_ms=int(job.processedOn) if job.processedOn else None,
        finished_on_ms=int(job.finishedOn) if job.finishedOn else None,
        attempts_made=int(job.attemptsMade or 0),
        failed_reason=job.failedReason,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _select(queue: Queue, name: str, selection: JobFilter, now_ms: int, room: int | None) -> list[Job]:
    """Page through one state of one queue, newest first, keeping the jobs the filter matches."""
    # Finished sets are scored by finishedOn: newest first means a page past the newer_than bound
    # ends the scan; waiting lists are in insertion order, so those are scanned whole.
    selected: list[Job] = []
    start = 0
    while room is None or len(selected) < room:
        page = await queue.getJobs([selection.state], start, start + _PAGE - 1, False)
        if not page:
            break
        for job in page:
            info = _job_info(name, selection.state, job)
            if selection.matches(info, now_ms):
                selected.append(job)
                if room is not None and len(selected) >= room:
                    break
        start += _PAGE
        oldest = _job_info(name, selection.state, page[-1])
        if (
            selection.state in {"completed", "failed"}
            and selection.newer_than_seconds is not None
            and oldest.age_seconds(now_ms) > selection.newer_than_seconds
        ):
            break
    return selected


async def _list_jobs(
    redis_settings: RedisSettings, queue_settings: QueueSettings, selection: JobFilter, now_ms: int
) -> list[JobInfo]:
    conn = async_client(redis_settings)
    try:
        found: list[JobInfo] = []
        for name in selection.queues:
            queue = Queue(name, {"connection": conn, "prefix": queue_settings.prefix})
            room = None if selection.limit is None else selection.limit - len(found)
            if room == 0:
                break
            jobs = await _select(queue, name, selection, now_ms, room)
            found.extend(_job_info(name, selection.state, job) for job in jobs)
        return found
    finally:
        await conn.aclose()


def list_jobs(
    redis_settings: RedisSettings, queue_settings: QueueSettings, selection: JobFilter
) -> list[JobInfo]:
    """The jobs ``selection`` matches, newest first per queue, read with BullMQ's ``getJobs`` script.

    Raises:
        redis.RedisError: Redis cannot be reached or refused the script.
    """
    return run_async(_list_jobs(redis_settings, queue_settings, selection, _now_ms()))


@dataclass(frozen=True)
class StalledJob:
    """An active job whose lock has expired: its worker died or hangs, and no one is processing it."""

    queue: str
    id: str
    name: str
    active_for_seconds: float | None
    attempts_made: int
    stalled_counter: int

    def as_row(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "id": self.id,
            "name": self.name,
            "active_for_s": None if self.active_for_seconds is None else round(self.active_for_seconds, 1),
            "attempts": self.attempts_made,
            "stalled_count": self.stalled_counter,
        }


async def _stalled_jobs(redis_settings: RedisSettings, queue_settings: QueueSettings) -> list[StalledJob]:
    conn = async_client(redis_settings)
    now_ms = _now_ms()
    try:
        stalled: list[StalledJob] = []
        for name in queue_settings.names:
            queue = Queue(name, {"connection": conn, "prefix": queue_settings.prefix})
            active = await queue.getJobs(["active"], 0, -1, True)
            for job in active:
                # A live worker renews the job's lock every lockDuration/2; no lock key means no owner.
                if await conn.exists(f"{queue.toKey(str(job.id))}:lock"):
                    continue
                started = int(job.processedOn) if job.processedOn else None
                stalled.append(
                    StalledJob(
                        queue=name,
                        id=str(job.id),
                        name=str(job.name),
                        active_for_seconds=None if started is None else max(0.0, (now_ms - started) / 1000),
                        attempts_made=int(job.attemptsMade or 0),
                        stalled_counter=int(job.stalledCounter or 0),
                    )
                )
        return stalled
    finally:
        await conn.aclose()


def stalled_jobs(redis_settings: RedisSettings, queue_settings: QueueSettings) -> list[StalledJob]:
    """Active jobs of every configured queue whose lock key has expired (stuck in "active").

    A running worker's stalled-job checker moves such jobs back to waiting within its
    ``stalledInterval``; when they stay, no worker is running the checker: restart the worker.

    Raises:
        redis.RedisError: Redis cannot be reached or refused the script.
    """
    return run_async(_stalled_jobs(redis_settings, queue_settings))


@dataclass(frozen=True)
class JobPlan:
    """The exact jobs an operation will touch, computed by the same code for a dry run and for real."""

    operation: str
    selection: JobFilter
    jobs: tuple[JobInfo, ...]
    planned_at_ms: int

    def __post_init__(self) -> None:
        if self.operation not in OPERATION_STATES:
            raise ParameterError(f"unknown job operation {self.operation!r}; use retry or clean")
        if self.selection.state not in OPERATION_STATES[self.operation]:
            raise ParameterError(
                f"{self.operation} works on {' or '.join(OPERATION_STATES[self.operation])} jobs,"
                f" not {self.selection.state}"
            )


def plan_job_operation(
    redis_settings: RedisSettings, queue_settings: QueueSettings, operation: str, selection: JobFilter
) -> JobPlan:
    """Select the jobs ``operation`` (``retry`` or ``clean``) would touch; changes nothing.

    Raises:
        ParameterError: the operation does not apply to the filter's state.
        redis.RedisError: Redis cannot be reached.
    """
    # Validate the operation before reading anything.
    JobPlan(operation=operation, selection=selection, jobs=(), planned_at_ms=0)
    now_ms = _now_ms()
    jobs = run_async(_list_jobs(redis_settings, queue_settings, selection, now_ms))
    return JobPlan(operation=operation, selection=selection, jobs=tuple(jobs), planned_at_ms=now_ms)


@dataclass(frozen=True)
class JobChange:
    """What happened to one planned job."""

    queue: str
    id: str
    name: str
    outcome: str  # "retried" | "removed" | "would retry" | "would remove" | "skipped"
    detail: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "id": self.id,
            "name": self.name,
            "outcome": self.outcome,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class JobOperationRecord:
    """The change record of a job operation (also of its dry run, where nothing changed)."""

    operation: str
    dry_run: bool
    selection: str
    planned: int
    changed: int
    skipped: int
    batches: int
    duration_seconds: float
    jobs: tuple[JobChange, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "dry_run": self.dry_run,
            "selection": self.selection,
            "planned": self.planned,
            "changed": self.changed,
            "skipped": self.skipped,
            "batches": self.batches,
            "duration_seconds": self.duration_seconds,
        }


_DONE = {"retry": "retried", "clean": "removed"}
_WOULD = {"retry": "would retry", "clean": "would remove"}


async def _apply_one(queue: Queue, plan: JobPlan, info: JobInfo, reset_attempts: bool) -> JobChange:
    job = await queue.getJob(info.id)
    if job is None:
        return JobChange(info.queue, info.id, info.name, "skipped", "job no longer exists")
    try:
        if plan.operation == "retry":
            # reprocessJob: the job must still be in the failed set, else BullMQ refuses (-3).
            await job.retry(plan.selection.state, {"resetAttemptsMade": reset_attempts})
        else:
            state = await queue.getJobState(info.id)
            if state != plan.selection.state:
                return JobChange(
                    info.queue, info.id, info.name, "skipped", f"now {state}, not {plan.selection.state}"
                )
            await job.remove()
    except Exception as exc:
        # BullMQ raises plain Exceptions for "not in the expected state" and "locked": the job moved on.
        return JobChange(info.queue, info.id, info.name, "skipped", " ".join(str(exc).split())[:200])
    return JobChange(info.queue, info.id, info.name, _DONE[plan.operation])


async def _apply_batch(
    redis_settings: RedisSettings,
    queue_settings: QueueSettings,
    plan: JobPlan,
    batch: Sequence[JobInfo],
    reset_attempts: bool,
) -> list[JobChange]:
    conn = async_client(redis_settings)
    try:
        queues = {
            name: Queue(name, {"connection": conn, "prefix": queue_settings.prefix})
            for name in plan.selection.queues
        }
        return list(
            await asyncio.gather(*(_apply_one(queues[j.queue], plan, j, reset_attempts) for j in batch))
        )
    finally:
        await conn.aclose()


def apply_job_plan(
    redis_settings: RedisSettings,
    queue_settings: QueueSettings,
    plan: JobPlan,
    *,
    confirm: bool,
    batch_size: int = 50,
    rate_per_second: float = 20.0,
    reset_attempts: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> JobOperationRecord:
    """The one gate for mutating BullMQ jobs: without ``confirm`` it reports what it would do.

    Retry moves each planned failed job back to waiting with BullMQ's ``reprocessJob`` script
    (``Job.retry``); clean removes each planned finished job with ``removeJob`` (``Job.remove``).
    Only the planned jobs are touched: a job that left its state since the plan (retried by
    someone else, removed, locked) is skipped and reported, so a second run changes nothing.

    Args:
        plan: from :func:`plan_job_operation`.
        confirm: False (dry run) changes nothing and lists the exact jobs.
        batch_size: jobs per batch (sent at once).
        rate_per_second: at most this many jobs per second over the run.
        reset_attempts: retry with ``attemptsMade`` reset, so a job gets its full attempts again.
        on_progress: called with (done, total) after each batch.

    Raises:
        ParameterError: batch_size below 1 or rate not positive, before anything changed.
        redis.RedisError: Redis cannot be reached.
    """
    if batch_size < 1:
        raise ParameterError("batch_size must be at least 1")
    if rate_per_second <= 0:
        raise ParameterError("rate_per_second must be positive")
    started = time.monotonic()
    if not confirm or not plan.jobs:
        would = [JobChange(j.queue, j.id, j.name, _WOULD[plan.operation]) for j in plan.jobs]
        return JobOperationRecord(
            operation=plan.operation,
            dry_run=not confirm,
            selection=plan.selection.describe(),
            planned=len(plan.jobs),
            changed=0,
            skipped=0,
            batches=0,
            duration_seconds=0.0,
            jobs=tuple(would) if not confirm else (),
        )
    changes: list[JobChange] = []
    batches = 0
    for offset in range(0, len(plan.jobs), batch_size):
        if batches:
            # Rate limit over the whole run: a retried burst must not swamp the worker or the app's
            # dependencies (the reason the jobs failed may be a rate-limited upstream).
            ahead = len(changes) / rate_per_second - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        batch = plan.jobs[offset : offset + batch_size]
        changes += run_async(_apply_batch(redis_settings, queue_settings, plan, batch, reset_attempts))
        batches += 1
        if on_progress is not None:
            # Called here, outside the event loop, so it may publish progress artifacts.
            on_progress(len(changes), len(plan.jobs))
    done = sum(1 for c in changes if c.outcome == _DONE[plan.operation])
    return JobOperationRecord(
        operation=plan.operation,
        dry_run=False,
        selection=plan.selection.describe(),
        planned=len(plan.jobs),
        changed=done,
        skipped=len(changes) - done,
        batches=batches,
        duration_seconds=round(time.monotonic() - started, 3),
        jobs=tuple(changes),
    )


list_jobs_task = ops_task(list_jobs, name="list-jobs")
stalled_jobs_task = ops_task(stalled_jobs, name="find-stalled-jobs")
plan_job_operation_task = ops_task(plan_job_operation, name="plan-job-operation")
# No retries: a retry after a partial batch would re-read nothing new (planned jobs are skipped
# once they left their state), but an operator should see the first error as it happened.
apply_job_plan_task = ops_task(apply_job_plan, name="apply-job-plan")
