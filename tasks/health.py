"""The health report: every check's evidence and status, in the runbook's JSON shape.

```json
{"status": "healthy", "timestamp": "2024-01-15T10:30:00.000Z",
 "checks": {"redis": {"status": "healthy", "latency": 5},
            "postgres": {"status": "healthy", "latency": 10},
            "queue": {"status": "healthy", "active": 2, "waiting": 0}}}
```

Each check runs under a hard deadline in its own thread: a server that is down, refuses or hangs
makes its check ``unhealthy`` with the (masked) error, never a crash or a hang of the whole run.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from tasks import http as http_probe
from tasks import postgres, queues, redisdb
from tasks.secrets import mask_url, safe_error
from tasks.settings import OpsSettings


class Status(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def rank(self) -> int:
        return {"healthy": 0, "degraded": 1, "unhealthy": 2}[self.value]


def worst(statuses: list[Status]) -> Status:
    """The worst of the statuses (healthy when there are none)."""
    return max(statuses, key=lambda s: s.rank, default=Status.HEALTHY)


class CheckResult(BaseModel):
    """One check's outcome: status, latency in ms, warnings, the error, and its evidence."""

    status: Status
    latency: float | None = Field(default=None, description="round trip in milliseconds")
    error: str | None = None
    warnings: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)

    def as_runbook(self) -> dict[str, Any]:
        """The check as the runbook shows it: status and latency first, then the details."""
        out: dict[str, Any] = {"status": self.status.value}
        if self.latency is not None:
            out["latency"] = self.latency
        out.update(self.details)
        if self.warnings:
            out["warnings"] = self.warnings
        if self.error:
            out["error"] = self.error
        return out


class HealthReport(BaseModel):
    """The whole health report."""

    stack: str
    status: Status
    timestamp: datetime
    checks: dict[str, CheckResult]

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, check in self.checks.items() if check.status is not Status.HEALTHY]

    def as_runbook(self) -> dict[str, Any]:
        """JSON in the runbook's shape (``status``, ``timestamp``, ``checks.<name>``)."""
        return {
            "status": self.status.value,
            "timestamp": self.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "checks": {name: check.as_runbook() for name, check in self.checks.items()},
        }


def run_with_deadline(name: str, check: Callable[[], CheckResult], deadline_seconds: float) -> CheckResult:
    """Run ``check`` in a daemon thread; past the deadline the check is unhealthy and left behind.

    Socket timeouts bound the probes already; the deadline also covers what they do not (a DNS
    lookup that hangs, a server that accepts and never answers a script).
    """
    outcome: list[CheckResult] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(check())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"health-{name}", daemon=True)
    thread.start()
    thread.join(deadline_seconds)
    if thread.is_alive():
        return CheckResult(
            status=Status.UNHEALTHY,
            error=f"no answer within {deadline_seconds:g}s (check abandoned); is the service hanging?",
        )
    if failure:
        exc = failure[0]
        return CheckResult(status=Status.UNHEALTHY, error=f"{type(exc).__name__}: {exc}")
    return outcome[0]


def check_postgres(settings: OpsSettings) -> CheckResult:
    """PostgreSQL: ``SELECT 1`` latency, server version, connections in use vs ``max_connections``."""
    limits = settings.health
    try:
        probe = postgres.probe_postgres(settings.postgres)
    except Exception as exc:
        return CheckResult(status=Status.UNHEALTHY, error=safe_error(exc, settings.postgres))
    warnings = []
    if probe.latency_ms > limits.postgres_latency_warn_ms:
        warnings.append(f"latency {probe.latency_ms} ms is over {limits.postgres_latency_warn_ms} ms")
    if probe.connections_ratio >= limits.connections_warn_ratio:
        warnings.append(
            f"{probe.connections} of {probe.max_connections} connections in use"
            f" (over {limits.connections_warn_ratio:.0%}); see diagnose for who holds them"
        )
    return CheckResult(
        status=Status.DEGRADED if warnings else Status.HEALTHY,
        latency=probe.latency_ms,
        warnings=warnings,
        details={
            "version": probe.server_version,
            "connections": probe.connections,
            "max_connections": probe.max_connections,
        },
    )


def check_redis(settings: OpsSettings) -> CheckResult:
    """Redis: PING latency, used memory vs ``maxmemory``, ``maxmemory-policy`` (BullMQ needs noeviction)."""
    limits = settings.health
    try:
        probe = redisdb.probe_redis(settings.redis)
    except Exception as exc:
        return CheckResult(status=Status.UNHEALTHY, error=safe_error(exc, settings.redis))
    warnings = []
    if probe.latency_ms > limits.redis_latency_warn_ms:
        warnings.append(f"latency {probe.latency_ms} ms is over {limits.redis_latency_warn_ms} ms")
    if probe.maxmemory_policy != redisdb.REQUIRED_POLICY:
        warnings.append(
            f"maxmemory-policy is {probe.maxmemory_policy!r}: BullMQ needs 'noeviction' or Redis may"
            " evict job keys; set it with CONFIG SET maxmemory-policy noeviction and in redis.conf"
        )
    ratio = probe.memory_ratio
    if ratio is not None and ratio >= limits.redis_memory_warn_ratio:
        warnings.append(f"used memory is {ratio:.0%} of maxmemory; see diagnose (Redis out of memory)")
    return CheckResult(
        status=Status.DEGRADED if warnings else Status.HEALTHY,
        latency=probe.latency_ms,
        warnings=warnings,
        details={
            "version": probe.version,
            "used_memory": probe.used_memory,
            "maxmemory": probe.maxmemory,
            "maxmemory_policy": probe.maxmemory_policy,
        },
    )


def check_queues(settings: OpsSettings) -> CheckResult:
    """BullMQ: exact job counts by state per configured queue, totals at the top level."""
    limits = settings.health
    try:
        counts = queues.queue_counts(settings.redis, settings.queue)
    except Exception as exc:
        return CheckResult(status=Status.UNHEALTHY, error=safe_error(exc, settings.redis))
    totals = {state: sum(q[state] for q in counts) for state in queues.JOB_STATES}
    warnings = []
    if totals["failed"] > limits.failed_jobs_warn:
        warnings.append(
            f"{totals['failed']} failed jobs (over {limits.failed_jobs_warn}); see retry-failed-jobs"
        )
    if totals["waiting"] > limits.waiting_jobs_warn:
        warnings.append(
            f"{totals['waiting']} waiting jobs (over {limits.waiting_jobs_warn}); is the worker running?"
        )
    paused = [q.name for q in counts if q.is_paused]
    if paused:
        warnings.append(f"paused queues: {', '.join(paused)}")
    details: dict[str, Any] = dict(totals)
    details["queues"] = {q.name: {**q.counts, "is_paused": q.is_paused} for q in counts}
    return CheckResult(
        status=Status.DEGRADED if warnings else Status.HEALTHY, warnings=warnings, details=details
    )


def check_http(url: str, settings: OpsSettings) -> CheckResult:
    """One of the app's own health endpoints: 2xx expected, and a JSON ``status`` honoured when given."""
    limits = settings.health
    try:
        probe = http_probe.probe_http(url, timeout=limits.timeout_seconds)
    except Exception as exc:
        return CheckResult(status=Status.UNHEALTHY, error=safe_error(exc))
    details: dict[str, Any] = {"url": probe.url, "status_code": probe.status_code}
    if isinstance(probe.body, dict):
        details["body"] = probe.body
    if not 200 <= probe.status_code < 300:
        return CheckResult(
            status=Status.UNHEALTHY,
            latency=probe.latency_ms,
            error=f"HTTP {probe.status_code} from {probe.url}",
            details=details,
        )
    warnings = []
    body_status = probe.body.get("status") if isinstance(probe.body, dict) else None
    if isinstance(body_status, str) and body_status.lower() not in {"healthy", "ok", "up", "pass"}:
        warnings.append(f"endpoint reports status {body_status!r}")
    if probe.latency_ms > limits.http_latency_warn_ms:
        warnings.append(f"latency {probe.latency_ms} ms is over {limits.http_latency_warn_ms} ms")
    return CheckResult(
        status=Status.DEGRADED if warnings else Status.HEALTHY,
        latency=probe.latency_ms,
        warnings=warnings,
        details=details,
    )


WAL_ARCHIVE_CHECK = "wal-archive"


def wal_archive_in_use(settings: OpsSettings) -> bool:
    """Whether point-in-time recovery is in use: the storage holds a base backup or archived WAL.
    A storage that cannot tell counts as not in use (health then reports as without it)."""
    from tasks.storage import open_storage
    from tasks.wal.status import archive_in_use

    try:
        return archive_in_use(open_storage(settings.storage, attempts=1))
    except Exception:
        return False


def check_wal_archive(settings: OpsSettings) -> CheckResult:
    """The point-in-time archive: newest WAL received and its age (the RPO), the slot's retained WAL
    and whether it streams, the restorable window and timelines; degraded with the archive's problems
    (RPO past ``wal.rpo_warn_seconds``, slot lag, gaps, no base backup)."""
    from tasks.wal.status import archive_status

    try:
        status = archive_status(settings)
    except Exception as exc:
        return CheckResult(
            status=Status.DEGRADED, error=f"the WAL archive could not be read: {safe_error(exc, settings)}"
        )
    slot = status.slot
    return CheckResult(
        status=Status.DEGRADED if status.problems else Status.HEALTHY,
        warnings=list(status.problems),
        details={
            "last_wal": status.last_wal,
            "last_wal_at": None if status.last_wal_at is None else status.last_wal_at.isoformat(),
            "rpo_seconds": status.rpo_seconds,
            "rpo_warn_seconds": settings.wal.rpo_warn_seconds,
            "slot": settings.wal.slot,
            "slot_active": None if slot is None else slot.active,
            "slot_retained_bytes": None if slot is None else slot.lag_bytes,
            "caught_up": status.caught_up,
            "window_start": None if status.window_start is None else status.window_start.isoformat(),
            "window_start_backup": status.window_start_backup,
            "window_end": None if status.window_end is None else status.window_end.isoformat(),
            "window_end_wal": status.window_end_wal,
            "timelines": status.timelines,
            "base_backups": status.base_backups,
        },
    )


def run_wal_archive_check(settings: OpsSettings) -> CheckResult | None:
    """:func:`check_wal_archive` under the checks' deadline, when the archive is in use.

    None when point-in-time recovery is not in use, or the storage did not say so before the
    deadline: without it the health report stays as it was. An archive problem is degraded at worst,
    even a hang: the app itself is not down, and DevOps hears of the RPO by its own event.
    """
    in_use: list[bool] = []

    def check() -> CheckResult:
        in_use.append(wal_archive_in_use(settings))
        return check_wal_archive(settings) if in_use[0] else CheckResult(status=Status.HEALTHY)

    result = run_with_deadline(WAL_ARCHIVE_CHECK, check, settings.health.timeout_seconds * 2 + 1)
    if not in_use or not in_use[0]:
        return None
    if result.status is Status.UNHEALTHY:
        return result.model_copy(update={"status": Status.DEGRADED})
    return result


def http_check_name(url: str) -> str:
    """The check name of one configured endpoint (its URL, password masked)."""
    return f"http:{mask_url(url)}"


def all_checks(settings: OpsSettings) -> dict[str, Callable[[], CheckResult]]:
    """Every check the settings ask for, by name."""
    checks: dict[str, Callable[[], CheckResult]] = {
        "postgres": lambda: check_postgres(settings),
        "redis": lambda: check_redis(settings),
        "queue": lambda: check_queues(settings),
    }
    for url in settings.health.urls:
        checks[http_check_name(url)] = functools.partial(check_http, url, settings)
    return checks


def run_checks(settings: OpsSettings) -> HealthReport:
    """Run every check at once, each under its deadline, and fold them into one report."""
    checks = all_checks(settings)
    # Probes' own timeouts are the first bound; the deadline adds a margin for connect + query.
    deadline = settings.health.timeout_seconds * 2 + 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(checks)) as pool:
        futures = {name: pool.submit(run_with_deadline, name, fn, deadline) for name, fn in checks.items()}
        results = {name: future.result() for name, future in futures.items()}
    return assemble_report(settings.stack, results)


def assemble_report(stack: str, results: dict[str, CheckResult]) -> HealthReport:
    """Overall status is the worst check's status."""
    return HealthReport(
        stack=stack,
        status=worst([r.status for r in results.values()]),
        timestamp=datetime.now(UTC),
        checks=results,
    )
