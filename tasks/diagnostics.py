"""Diagnostics: the evidence the runbook's "Common Issues" and "Performance Troubleshooting" gather by
hand, gathered by plain functions, each returning a :class:`Diagnosis` with typed evidence and
findings. A finding has a severity, the runbook section it comes from, the runbook's suggested
resolution and the flow that performs it.

Everything here is read-only. A service that is down is a finding, never an exception: each check
handles the failures it expects, and :func:`run_diagnostic` turns anything else (and a hang past the
deadline) into a finding too.
"""

from __future__ import annotations

import enum
import grp
import ipaddress
import os
import pwd
import re
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from tasks import postgres, queues, redisdb
from tasks.runtime import ResourceUsage, ServiceStatus, get_runtime
from tasks.secrets import mask_text
from tasks.settings import DiagnoseSettings, OpsSettings, PostgresSettings, RedisSettings

# --- Runbook sections and the flows that perform their resolutions ----------------------------------

RB_DATABASE = "Common Issues 1: Database Connection Issues"
RB_REDIS = "Common Issues 2: Redis Connection Issues"
RB_WORKER = "Common Issues 3: Worker Not Processing Jobs"
RB_MEMORY = "Common Issues 4: High Memory Usage"
RB_SLOW = "Common Issues 5: Slow Response Times"
RB_UPLOADS = "Common Issues 6: File Upload Failures"
RB_CPU = "Performance Troubleshooting: High CPU Usage"
RB_DB_LOAD = "Performance Troubleshooting: High Database Load"
RB_NETWORK = "Performance Troubleshooting: Network Issues"

FLOW_RESTART = "restart-services"
FLOW_RETRY = "retry-failed-jobs"
FLOW_CLEAN_JOBS = "clean-jobs"
FLOW_CLEANUP_UPLOADS = "cleanup-uploads"
FLOW_OUTAGE = "outage-triage"

_QUERY_TEXT_LIMIT = 500


class Severity(enum.StrEnum):
    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return {"ok": 0, "info": 1, "warning": 2, "critical": 3}[self.value]


def worst(severities: Sequence[Severity]) -> Severity:
    """The worst severity (ok when there is none)."""
    return max(severities, key=lambda s: s.rank, default=Severity.OK)


@dataclass(frozen=True)
class Finding:
    """One thing the evidence shows, what the runbook says to do about it, and which flow does it."""

    check: str
    severity: Severity
    summary: str
    runbook: str
    resolution: str | None = None
    flow: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "check": self.check,
            "finding": self.summary,
            "runbook": self.runbook,
            "resolution": self.resolution,
            "flow": self.flow,
        }


class Evidence(Protocol):
    """Typed evidence of one check; ``rows()`` is what its table shows."""

    def rows(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Diagnosis:
    """The outcome of one check: its evidence (None when it could not be gathered) and findings."""

    check: str
    title: str
    evidence: Evidence | None
    findings: tuple[Finding, ...] = ()
    error: str | None = None
    duration_ms: float = 0.0

    @property
    def severity(self) -> Severity:
        return worst([f.severity for f in self.findings])

    def rows(self) -> list[dict[str, Any]]:
        return self.evidence.rows() if self.evidence is not None else []


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _secrets(settings: OpsSettings) -> list[str]:
    values = [settings.postgres.dsn.get_secret_value(), settings.redis.url.get_secret_value()]
    values += [urlsplit(v).password or "" for v in list(values)]
    return values


def safe_error(exc: BaseException, settings: OpsSettings) -> str:
    """One line naming the error, every configured secret masked."""
    text = _one_line(str(exc)) or type(exc).__name__
    return mask_text(f"{type(exc).__name__}: {text}", _secrets(settings))


# --- SQL text: literals masked -------------------------------------------------------------------

_SQL_TOKEN = re.compile(
    r"""
      (?P<ident>"(?:[^"]|"")*"?)                                   # quoted identifier: kept
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*|)\$.*?(?:\$(?P=tag)\$|\Z))  # $$...$$, $x$...$x$
    | (?P<estr>[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z))                  # E'...' with backslash escapes
    | (?P<str>(?:[bBxXnN]|[uU]&)?'(?:[^']|'')*(?:'|\Z))          # '...', B'..', X'..', N'..', U&'..'
    | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))                     # comments: kept
    | (?P<word>[A-Za-z_\x80-\uffff][A-Za-z_0-9$\x80-\uffff]*)    # keywords, names (t1, col2): kept
    | (?P<param>\$\d+)                                           # placeholders: kept
    | (?P<num>0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+
        |(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)      # numeric literals
    """,
    re.VERBOSE | re.DOTALL,
)


def mask_sql_literals(query: str) -> str:
    """``query`` with every string and number literal replaced (``'?'`` and ``?``).

    Strings in any form (standard, ``E''``, dollar-quoted, bit/hex) become ``'?'``; numbers become
    ``?``; identifiers (also quoted ones, and names with digits such as ``t1``), keywords, ``$1``
    placeholders and comments are kept. A literal cut off by PostgreSQL's
    ``track_activity_query_size`` is masked to the end.
    """

    def replace(match: re.Match[str]) -> str:
        kind = match.lastgroup
        if kind == "tag":  # pragma: no cover - the tag group only occurs inside "dollar"
            kind = "dollar"
        if kind in {"dollar", "estr", "str"}:
            return "'?'"
        if kind == "num":
            return "?"
        return match.group(0)

    return _SQL_TOKEN.sub(replace, query)


def shown_query(query: str | None) -> str:
    """A query as reports show it: literals masked, whitespace folded, cut to a readable length."""
    return _one_line(mask_sql_literals(query or ""), _QUERY_TEXT_LIMIT)


# --- PostgreSQL ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionGroup:
    state: str
    application: str
    database: str
    count: int
    oldest_state_seconds: float | None


@dataclass(frozen=True)
class ConnectionsEvidence:
    """Client connections by state, application and database, against the server's limit."""

    max_connections: int
    reserved_connections: int
    groups: tuple[ConnectionGroup, ...]

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def available(self) -> int:
        """What non-superusers (the app) can open: max_connections less the reserved slots."""
        return max(1, self.max_connections - self.reserved_connections)

    @property
    def ratio(self) -> float:
        return self.total / self.available

    def by_state(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.state] = out.get(g.state, 0) + g.count
        return out

    def by_application(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.application] = out.get(g.application, 0) + g.count
        return out

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "state": g.state,
                "application": g.application,
                "database": g.database,
                "connections": g.count,
                "oldest_in_state_s": None
                if g.oldest_state_seconds is None
                else round(g.oldest_state_seconds, 1),
            }
            for g in self.groups
        ]


_CONNECTIONS_SQL = """
SELECT coalesce(state, 'unknown'),
       coalesce(nullif(application_name, ''), '(none)'),
       coalesce(datname, ''),
       count(*),
       greatest(0, max(extract(epoch FROM now() - state_change)))::float8
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY 1, 2, 3
ORDER BY 4 DESC, 1, 2
"""


def _unreachable_postgres(check: str, exc: BaseException, pg: PostgresSettings) -> Finding:
    message = postgres.safe_error(exc, pg)
    if "too many clients" in message or "remaining connection slots" in message:
        return Finding(
            check,
            Severity.CRITICAL,
            f"PostgreSQL refuses connections, all slots are taken: {message}",
            RB_DATABASE,
            "Connection pool exhausted: restart backend and worker to reset their connections"
            " (docker compose restart backend worker)",
            FLOW_RESTART,
        )
    return Finding(
        check,
        Severity.CRITICAL,
        f"cannot connect to PostgreSQL at {pg.masked_dsn}: {message}",
        RB_DATABASE,
        "Restart the database if it is down (docker compose restart postgres / kubectl rollout restart"
        " deployment/postgres); check reachability below",
        FLOW_RESTART,
    )


def _diag_connect(pg: PostgresSettings) -> psycopg.Connection:
    return postgres.connect(pg, application_name="swagger2mcp-ops-diagnose")


def postgres_connections(pg: PostgresSettings, limits: DiagnoseSettings) -> Diagnosis:
    """Runbook 1 "Check connection count", by state and application, vs ``max_connections``."""
    check, title = "postgres-connections", "PostgreSQL connections"
    try:
        with _diag_connect(pg) as conn:
            rows = conn.execute(_CONNECTIONS_SQL).fetchall()
            limit_row = conn.execute(
                "SELECT current_setting('max_connections')::int,"
                " current_setting('superuser_reserved_connections')::int"
                " + coalesce(current_setting('reserved_connections', true)::int, 0)"
            ).fetchone()
    except psycopg.Error as exc:
        return Diagnosis(check, title, None, (_unreachable_postgres(check, exc, pg),), error=str(exc))
    assert limit_row is not None
    evidence = ConnectionsEvidence(
        max_connections=int(limit_row[0]),
        reserved_connections=int(limit_row[1]),
        groups=tuple(
            ConnectionGroup(str(r[0]), str(r[1]), str(r[2]), int(r[3]), None if r[4] is None else float(r[4]))
            for r in rows
        ),
    )
    return Diagnosis(check, title, evidence, tuple(connection_findings(evidence, limits)))


def connection_findings(evidence: ConnectionsEvidence, limits: DiagnoseSettings) -> list[Finding]:
    """Findings from the connection counts (a pure function of the evidence)."""
    check = "postgres-connections"
    findings: list[Finding] = []
    top = ", ".join(
        f"{app} {n}" for app, n in sorted(evidence.by_application().items(), key=lambda i: -i[1])[:3]
    )
    summary = (
        f"{evidence.total} of {evidence.available} usable connections in use"
        f" (max_connections {evidence.max_connections}, {evidence.reserved_connections} reserved); top: {top}"
    )
    resolution = (
        "If the connection pool is exhausted: restart backend and worker to reset connections"
        " (docker compose restart backend worker)"
    )
    if evidence.ratio >= limits.connections_critical_ratio:
        findings.append(Finding(check, Severity.CRITICAL, summary, RB_DATABASE, resolution, FLOW_RESTART))
    elif evidence.ratio >= limits.connections_warn_ratio:
        findings.append(Finding(check, Severity.WARNING, summary, RB_DATABASE, resolution, FLOW_RESTART))
    else:
        findings.append(Finding(check, Severity.OK, summary, RB_DATABASE))
    stuck = [
        g
        for g in evidence.groups
        if g.state.startswith("idle in transaction")
        and (g.oldest_state_seconds or 0) >= limits.idle_in_transaction_warn_seconds
    ]
    if stuck:
        worst_group = max(stuck, key=lambda g: g.oldest_state_seconds or 0)
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"{sum(g.count for g in stuck)} connections idle in a transaction for over"
                f" {limits.idle_in_transaction_warn_seconds:g} s"
                f" (oldest {worst_group.oldest_state_seconds:.0f} s,"
                f" application {worst_group.application}); they hold locks and slots",
                RB_DATABASE,
                "Restart the application that holds them (backend/worker) to reset its connections;"
                " set idle_in_transaction_session_timeout",
                FLOW_RESTART,
            )
        )
    return findings


@dataclass(frozen=True)
class LongQuery:
    pid: int
    duration_seconds: float
    state: str
    application: str
    database: str
    wait_event: str
    query: str  # literals masked


@dataclass(frozen=True)
class LongQueriesEvidence:
    threshold_seconds: float
    queries: tuple[LongQuery, ...]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "pid": q.pid,
                "duration_s": round(q.duration_seconds, 1),
                "application": q.application,
                "database": q.database,
                "wait": q.wait_event,
                "query": q.query,
            }
            for q in self.queries
        ]


_LONG_QUERIES_SQL = """
SELECT pid,
       extract(epoch FROM now() - query_start)::float8,
       state,
       coalesce(nullif(application_name, ''), '(none)'),
       coalesce(datname, ''),
       coalesce(wait_event_type || ':' || wait_event, ''),
       query
FROM pg_stat_activity
WHERE state = 'active'
  AND backend_type = 'client backend'
  AND pid <> pg_backend_pid()
  AND now() - query_start > make_interval(secs => %s)
ORDER BY 2 DESC
LIMIT 50
"""


def long_queries(pg: PostgresSettings, threshold_seconds: float) -> Diagnosis:
    """Runbook 5 "Check database slow queries": active queries running longer than the threshold."""
    check, title = "postgres-long-queries", f"Queries running longer than {threshold_seconds:g} s"
    try:
        with _diag_connect(pg) as conn:
            rows = conn.execute(_LONG_QUERIES_SQL, (threshold_seconds,)).fetchall()
    except psycopg.Error as exc:
        return Diagnosis(check, title, None, (_unreachable_postgres(check, exc, pg),), error=str(exc))
    evidence = LongQueriesEvidence(
        threshold_seconds=threshold_seconds,
        queries=tuple(
            LongQuery(int(r[0]), float(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), shown_query(r[6]))
            for r in rows
        ),
    )
    if not evidence.queries:
        return Diagnosis(
            check, title, evidence, (Finding(check, Severity.OK, "no query runs that long", RB_SLOW),)
        )
    longest = evidence.queries[0]
    finding = Finding(
        check,
        Severity.WARNING,
        f"{len(evidence.queries)} queries running longer than {threshold_seconds:g} s; longest"
        f" {longest.duration_seconds:.1f} s (pid {longest.pid}, {longest.application}):"
        f" {longest.query[:120]}",
        RB_SLOW,
        "Identify the bottleneck; optimize slow queries (add indexes, review N+1 queries); scale"
        " horizontally if needed",
        None,
    )
    return Diagnosis(check, title, evidence, (finding,))


@dataclass(frozen=True)
class StatementStat:
    calls: int
    mean_ms: float
    total_ms: float
    rows: int
    query: str  # literals masked (pg_stat_statements already shows $1 for most)


@dataclass(frozen=True)
class TopStatementsEvidence:
    available: bool
    note: str | None
    statements: tuple[StatementStat, ...]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "mean_ms": round(s.mean_ms, 2),
                "calls": s.calls,
                "total_ms": round(s.total_ms, 1),
                "rows": s.rows,
                "query": s.query,
            }
            for s in self.statements
        ]


def top_statements(pg: PostgresSettings, limits: DiagnoseSettings) -> Diagnosis:
    """Performance "High Database Load": the top statements by mean time from ``pg_stat_statements``.

    Says so, as an info finding with what to do, when the extension is not installed in the
    application's database or not loaded by the server.
    """
    check, title = "postgres-top-statements", f"Top {limits.top_statements} statements by mean time"
    database = postgres.database_name(pg.dsn.get_secret_value())
    try:
        with _diag_connect(pg) as conn:
            ext = conn.execute(
                "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
                " WHERE e.extname = 'pg_stat_statements'"
            ).fetchone()
            if ext is None:
                note = (
                    f"pg_stat_statements is not installed in database {database}: add"
                    " shared_preload_libraries = 'pg_stat_statements' to postgresql.conf, restart, then"
                    " CREATE EXTENSION pg_stat_statements"
                )
                evidence = TopStatementsEvidence(False, note, ())
                return Diagnosis(check, title, evidence, (Finding(check, Severity.INFO, note, RB_DB_LOAD),))
            version = int(conn.execute("SELECT current_setting('server_version_num')::int").fetchone()[0])  # type: ignore[index]
            mean, total = (
                ("mean_exec_time", "total_exec_time") if version >= 130000 else ("mean_time", "total_time")
            )
            query = sql.SQL(
                "SELECT calls, {mean}, {total}, rows, query FROM {view}"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " ORDER BY {mean} DESC LIMIT %s"
            ).format(
                mean=sql.Identifier(mean),
                total=sql.Identifier(total),
                view=sql.Identifier(ext[0], "pg_stat_statements"),
            )
            try:
                rows = conn.execute(query, (limits.top_statements,)).fetchall()
            except psycopg.errors.ObjectNotInPrerequisiteState:
                note = (
                    "pg_stat_statements is installed but not loaded: add it to shared_preload_libraries"
                    " and restart PostgreSQL"
                )
                evidence = TopStatementsEvidence(False, note, ())
                return Diagnosis(check, title, evidence, (Finding(check, Severity.INFO, note, RB_DB_LOAD),))
    except psycopg.Error as exc:
        return Diagnosis(check, title, None, (_unreachable_postgres(check, exc, pg),), error=str(exc))
    evidence = TopStatementsEvidence(
        True,
        None,
        tuple(StatementStat(int(r[0]), float(r[1]), float(r[2]), int(r[3]), shown_query(r[4])) for r in rows),
    )
    slow = [s for s in evidence.statements if s.mean_ms >= limits.slow_statement_mean_ms]
    if not slow:
        summary = f"no statement's mean time is over {limits.slow_statement_mean_ms:g} ms"
        return Diagnosis(check, title, evidence, (Finding(check, Severity.OK, summary, RB_DB_LOAD),))
    finding = Finding(
        check,
        Severity.WARNING,
        f"{len(slow)} statements average over {limits.slow_statement_mean_ms:g} ms; slowest"
        f" {slow[0].mean_ms:.0f} ms over {slow[0].calls} calls: {slow[0].query[:120]}",
        RB_DB_LOAD,
        "Add indexes if needed; optimize the queries; consider read replicas for read-heavy load",
        None,
    )
    return Diagnosis(check, title, evidence, (finding,))


# --- Redis -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisMemory:
    """``INFO memory`` (and evictions from ``INFO stats``)."""

    used: int
    used_human: str
    peak: int
    peak_human: str
    maxmemory: int
    fragmentation_ratio: float | None
    policy: str
    evicted_keys: int

    @property
    def ratio(self) -> float | None:
        return self.used / self.maxmemory if self.maxmemory else None

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"metric": "used_memory", "value": f"{self.used} ({self.used_human})"},
            {"metric": "used_memory_peak", "value": f"{self.peak} ({self.peak_human})"},
            {"metric": "maxmemory", "value": self.maxmemory or "0 (no limit)"},
            {"metric": "used / maxmemory", "value": "" if self.ratio is None else f"{self.ratio:.0%}"},
            {"metric": "mem_fragmentation_ratio", "value": self.fragmentation_ratio},
            {"metric": "maxmemory_policy", "value": self.policy},
            {"metric": "evicted_keys", "value": self.evicted_keys},
        ]


def read_redis_memory(settings: RedisSettings) -> RedisMemory:
    """``INFO memory`` and ``INFO stats`` of the queues' Redis.

    Raises:
        redis.RedisError: Redis cannot be reached.
    """
    conn = redisdb.client(settings)
    try:
        memory = conn.info("memory")
        stats = conn.info("stats")
    finally:
        conn.close()
    frag = memory.get("mem_fragmentation_ratio")
    return RedisMemory(
        used=int(memory.get("used_memory", 0)),
        used_human=str(memory.get("used_memory_human", "")),
        peak=int(memory.get("used_memory_peak", 0)),
        peak_human=str(memory.get("used_memory_peak_human", "")),
        maxmemory=int(memory.get("maxmemory", 0)),
        fragmentation_ratio=None if frag is None else float(frag),
        policy=str(memory.get("maxmemory_policy", "unknown")),
        evicted_keys=int(stats.get("evicted_keys", 0)),
    )


def redis_memory_findings(memory: RedisMemory, limits: DiagnoseSettings) -> list[Finding]:
    """Findings from Redis memory figures (a pure function of the evidence)."""
    check = "redis-memory"
    findings: list[Finding] = []
    ratio = memory.ratio
    oom_resolution = (
        "Redis out of memory: clean old completed/failed jobs first (clean-jobs); the runbook's FLUSHDB"
        " (then restart worker) loses every job and is offered only behind an approval (flush-redis)"
    )
    if ratio is not None and ratio >= limits.redis_memory_critical_ratio:
        findings.append(
            Finding(
                check,
                Severity.CRITICAL,
                f"used memory {memory.used_human} is {ratio:.0%} of maxmemory ({memory.maxmemory} bytes)",
                RB_REDIS,
                oom_resolution,
                FLOW_CLEAN_JOBS,
            )
        )
    elif ratio is not None and ratio >= limits.redis_memory_warn_ratio:
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"used memory {memory.used_human} is {ratio:.0%} of maxmemory ({memory.maxmemory} bytes)",
                RB_REDIS,
                oom_resolution,
                FLOW_CLEAN_JOBS,
            )
        )
    if memory.policy != redisdb.REQUIRED_POLICY:
        evicting = memory.evicted_keys > 0
        findings.append(
            Finding(
                check,
                Severity.CRITICAL if evicting else Severity.WARNING,
                f"maxmemory-policy is {memory.policy!r}, BullMQ needs 'noeviction'"
                + (
                    f"; {memory.evicted_keys} keys were already evicted (jobs may be lost)"
                    if evicting
                    else ""
                ),
                RB_REDIS,
                "CONFIG SET maxmemory-policy noeviction, and set it in redis.conf so a restart keeps it",
                None,
            )
        )
    # Below ~10 MB used the ratio is noise (allocator overhead dominates).
    if (
        memory.fragmentation_ratio is not None
        and memory.fragmentation_ratio >= limits.redis_fragmentation_warn
        and memory.used >= 10 * 1024 * 1024
    ):
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"memory fragmentation ratio {memory.fragmentation_ratio:g}",
                RB_REDIS,
                "Restart Redis (docker compose restart redis) in a quiet moment, or enable activedefrag",
                FLOW_RESTART,
            )
        )
    if not findings:
        used = f"{memory.used_human}" + ("" if ratio is None else f" ({ratio:.0%} of maxmemory)")
        findings.append(Finding(check, Severity.OK, f"used {used}, policy {memory.policy}", RB_REDIS))
    return findings


def _unreachable_redis(check: str, exc: BaseException, settings: RedisSettings) -> Finding:
    return Finding(
        check,
        Severity.CRITICAL,
        f"cannot reach Redis at {settings.masked_url}: {redisdb.safe_error(exc, settings)}",
        RB_REDIS,
        "Restart Redis (docker compose restart redis); check reachability below",
        FLOW_RESTART,
    )


def redis_memory(settings: RedisSettings, limits: DiagnoseSettings) -> Diagnosis:
    """Runbook 2 "Check Redis memory": used, peak, maxmemory, fragmentation, policy, evictions."""
    check, title = "redis-memory", "Redis memory"
    try:
        memory = read_redis_memory(settings)
    except Exception as exc:
        return Diagnosis(check, title, None, (_unreachable_redis(check, exc, settings),), error=str(exc))
    return Diagnosis(check, title, memory, tuple(redis_memory_findings(memory, limits)))


# --- BullMQ queues ---------------------------------------------------------------------------------


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


def queue_findings(evidence: QueuesEvidence, limits: DiagnoseSettings) -> list[Finding]:
    """Findings from the queue evidence (a pure function of it)."""
    check = "queues"
    findings: list[Finding] = []
    if evidence.stalled:
        by_queue = ", ".join(
            f"{name} {sum(1 for j in evidence.stalled if j.queue == name)}"
            for name in dict.fromkeys(j.queue for j in evidence.stalled)
        )
        findings.append(
            Finding(
                check,
                Severity.CRITICAL,
                f"{len(evidence.stalled)} jobs stuck in active with an expired lock ({by_queue}): no worker"
                " owns them",
                RB_WORKER,
                "If jobs are stuck in active the worker may have crashed: restart the worker, it picks"
                " them up",
                FLOW_RESTART,
            )
        )
    for q in evidence.counts:
        workers = evidence.workers.get(q.name)
        if q.is_paused:
            findings.append(
                Finding(
                    check,
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
                    check,
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
                    check,
                    Severity.WARNING,
                    f"queue {q.name}: {q['waiting']} jobs waiting (over {limits.waiting_jobs_warn}),"
                    f" {q['active']} active, workers {'unknown' if workers is None else workers}",
                    RB_WORKER,
                    "Check the worker's logs for errors; restart the worker",
                    FLOW_RESTART,
                )
            )
        if q["failed"] > 0:
            reasons: dict[str, int] = {}
            for job in evidence.failed:
                if job.queue == q.name:
                    key = _one_line(job.failed_reason or "(no reason)", 80)
                    reasons[key] = reasons.get(key, 0) + 1
            shown = "; ".join(
                f"{reason} (x{n})" for reason, n in sorted(reasons.items(), key=lambda i: -i[1])[:3]
            )
            findings.append(
                Finding(
                    check,
                    Severity.WARNING,
                    f"queue {q.name}: {q['failed']} failed jobs"
                    + (f"; newest reasons: {shown}" if shown else ""),
                    RB_WORKER,
                    "Check the failed jobs' reasons; once the cause is fixed, retry them (dry run first)",
                    FLOW_RETRY,
                )
            )
    if not findings:
        totals = {s: sum(q[s] for q in evidence.counts) for s in ("waiting", "active", "failed")}
        findings.append(
            Finding(
                check,
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
    check, title = "queues", "BullMQ queues"
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
        return Diagnosis(
            check, title, None, (_unreachable_redis(check, exc, settings.redis),), error=str(exc)
        )
    evidence = QueuesEvidence(
        counts=tuple(counts),
        workers=workers,
        stalled=tuple(stalled),
        failed=tuple(failed),
        read_at_ms=int(time.time() * 1000),
    )
    return Diagnosis(check, title, evidence, tuple(queue_findings(evidence, limits)))


# --- Services (through the Runtime) ----------------------------------------------------------------


@dataclass(frozen=True)
class LogTail:
    service: str
    lines: int
    matches: tuple[str, ...]  # matching lines (masked), newest last
    error: str | None = None


@dataclass(frozen=True)
class ServicesEvidence:
    runtime: str
    services: tuple[ServiceStatus, ...]
    usage: tuple[ResourceUsage, ...]
    logs: tuple[LogTail, ...]

    def rows(self) -> list[dict[str, Any]]:
        usage = {u.name: u for u in self.usage}
        logs = {t.service: t for t in self.logs}
        rows = []
        for s in self.services:
            u = usage.get(s.name)
            t = logs.get(s.name)
            rows.append(
                {
                    "service": s.name,
                    "state": s.state,
                    "ready": f"{s.ready}/{s.desired}",
                    "restarts": s.restarts,
                    "image": s.image,
                    "cpu_percent": None if u is None or u.cpu_percent is None else round(u.cpu_percent, 1),
                    "memory_mib": None
                    if u is None or u.memory_bytes is None
                    else round(u.memory_bytes / 2**20, 1),
                    "log_matches": None if t is None else len(t.matches),
                }
            )
        return rows


def scan_log(service: str, text: str, patterns: Sequence[str], secrets: Sequence[str] = ()) -> LogTail:
    """The lines of a log tail that match any pattern (the runbook's ``grep -i "memory\\|heap"``)."""
    compiled = [re.compile(p) for p in patterns]
    lines = text.splitlines()
    matches = [
        mask_text(_one_line(line, 300), secrets) for line in lines if any(c.search(line) for c in compiled)
    ]
    return LogTail(service=service, lines=len(lines), matches=tuple(matches))


def service_findings(
    evidence: ServicesEvidence, expected: Sequence[str], limits: DiagnoseSettings
) -> list[Finding]:
    """Findings from services' status, restarts, logs and resource usage (a pure function)."""
    check = "services"
    findings: list[Finding] = []
    if evidence.runtime == "none":
        return [
            Finding(
                check,
                Severity.INFO,
                "runtime kind is 'none': service status, restarts, logs and resource usage are not"
                " collected; set OPS_RUNTIME__KIND to compose or kubernetes",
                RB_MEMORY,
            )
        ]
    present = {s.name for s in evidence.services}
    # A runtime may list a configured service it cannot find with state "missing".
    missing = {s.name for s in evidence.services if s.state == "missing"}
    for name in expected:
        if name not in present or name in missing:
            findings.append(
                Finding(
                    check,
                    Severity.CRITICAL,
                    f"service {name} is not running at all (not found by the {evidence.runtime} runtime)",
                    RB_WORKER if name == "worker" else RB_DATABASE,
                    "Start it; if everything is down follow Total Service Outage",
                    FLOW_OUTAGE,
                )
            )
    logs = {t.service: t for t in evidence.logs}
    for s in evidence.services:
        if s.name in missing:
            continue
        runbook = RB_WORKER if "worker" in s.name else RB_MEMORY
        if s.desired == 0:
            findings.append(
                Finding(
                    check,
                    Severity.WARNING,
                    f"service {s.name} is scaled to 0",
                    runbook,
                    "Scale it back",
                    None,
                )
            )
        elif not s.healthy:
            findings.append(
                Finding(
                    check,
                    Severity.CRITICAL,
                    f"service {s.name} is {s.state}: {s.ready} of {s.desired} ready",
                    runbook,
                    f"Restart {s.name} (docker compose restart {s.name} / kubectl rollout restart)",
                    FLOW_RESTART,
                )
            )
        if s.restarts >= limits.restarts_warn:
            findings.append(
                Finding(
                    check,
                    Severity.WARNING,
                    f"service {s.name} restarted {s.restarts} times (OOM kills show as restarts)",
                    RB_MEMORY,
                    "Restart the affected service; increase memory limits if the usage is legitimate;"
                    " investigate a memory leak (heap profiling, unclosed connections, recent changes)",
                    FLOW_RESTART,
                )
            )
        tail = logs.get(s.name)
        if tail is not None and tail.matches:
            findings.append(
                Finding(
                    check,
                    Severity.INFO,
                    f"{len(tail.matches)} of the last {tail.lines} log lines of {s.name} match error/memory"
                    f" patterns; newest: {tail.matches[-1][:160]}",
                    RB_MEMORY,
                    "Read the log excerpt in the report",
                    None,
                )
            )
    for u in evidence.usage:
        if u.cpu_percent is not None and u.cpu_percent >= limits.cpu_warn_percent:
            findings.append(
                Finding(
                    check,
                    Severity.WARNING,
                    f"service {u.name} uses {u.cpu_percent:.0f}% CPU",
                    RB_CPU,
                    "Check for CPU-intensive work (large files, schema parsing, loops); scale if the load"
                    " is legitimate (kubectl scale deployment backend --replicas=3)",
                    None,
                )
            )
    if not findings:
        findings.append(
            Finding(check, Severity.OK, f"{len(evidence.services)} services running and ready", RB_MEMORY)
        )
    return findings


def services(settings: OpsSettings) -> Diagnosis:
    """Runbook "Detailed Service Checks" / 4: status, restarts, log tails and resource usage."""
    check, title = "services", "Services"
    limits = settings.diagnose
    secrets = _secrets(settings)
    try:
        runtime = get_runtime(settings)
        statuses = runtime.list_services()
    except Exception as exc:
        text = safe_error(exc, settings)
        finding = Finding(
            check,
            Severity.WARNING,
            f"the {settings.runtime.kind} runtime cannot list the services: {text}",
            RB_WORKER,
            "Check the runtime's API (Docker Engine socket, Kubernetes credentials and namespace)",
            None,
        )
        return Diagnosis(check, title, None, (finding,), error=text)
    try:
        usage = runtime.resource_usage()
    except Exception as exc:
        # Metrics are optional (no metrics API, stats refused): the rest of the evidence still counts.
        usage = [ResourceUsage(name="*", cpu_percent=None, memory_bytes=None, available=False, note=str(exc))]
    tails = []
    if limits.log_tail_lines:
        for status in statuses:
            if status.state == "missing":
                continue
            try:
                text = runtime.logs(status.name, tail=limits.log_tail_lines)
            except Exception as exc:
                tails.append(LogTail(status.name, 0, (), error=safe_error(exc, settings)))
                continue
            tails.append(scan_log(status.name, text, limits.log_patterns, secrets))
    evidence = ServicesEvidence(runtime.kind, tuple(statuses), tuple(usage), tuple(tails))
    return Diagnosis(
        check, title, evidence, tuple(service_findings(evidence, settings.runtime.services, limits))
    )


# --- Disk and uploads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskSpace:
    path: str
    checked: str  # the nearest existing ancestor actually measured
    total: int
    free: int

    @property
    def free_ratio(self) -> float:
        return self.free / self.total if self.total else 0.0


@dataclass(frozen=True)
class DiskEvidence:
    disks: tuple[DiskSpace, ...]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "path": d.path,
                "measured_at": d.checked,
                "size_gib": round(d.total / 2**30, 2),
                "free_gib": round(d.free / 2**30, 2),
                "free": f"{d.free_ratio:.0%}",
            }
            for d in self.disks
        ]


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_paths(settings: OpsSettings) -> list[Path]:
    """The paths whose filesystems are checked: uploads root, file storage, configured extras."""
    paths = [settings.uploads.root]
    storage = urlsplit(settings.storage.url)
    if storage.scheme == "file":
        paths.append(Path(storage.netloc + storage.path))
    paths += settings.diagnose.disk_paths
    return paths


def disk_space(paths: Sequence[Path], limits: DiagnoseSettings) -> Diagnosis:
    """Runbook 6 "Check disk space" (``df -h``) for each path's filesystem, once per filesystem."""
    check, title = "disk", "Disk space"
    seen: set[int] = set()
    disks: list[DiskSpace] = []
    for path in paths:
        measured = _existing(Path(path))
        device = measured.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        usage = shutil.disk_usage(measured)
        disks.append(DiskSpace(str(path), str(measured), usage.total, usage.free))
    evidence = DiskEvidence(tuple(disks))
    return Diagnosis(check, title, evidence, tuple(disk_findings(evidence, limits)))


def disk_findings(evidence: DiskEvidence, limits: DiagnoseSettings) -> list[Finding]:
    check = "disk"
    findings = []
    for d in evidence.disks:
        summary = f"{d.path}: {d.free_ratio:.0%} free ({d.free / 2**30:.1f} GiB of {d.total / 2**30:.1f} GiB)"
        resolution = "Clean up old uploads if the disk is full (dry run first); prune old backups"
        if d.free_ratio <= limits.disk_free_critical_ratio:
            findings.append(
                Finding(check, Severity.CRITICAL, summary, RB_UPLOADS, resolution, FLOW_CLEANUP_UPLOADS)
            )
        elif d.free_ratio <= limits.disk_free_warn_ratio:
            findings.append(
                Finding(check, Severity.WARNING, summary, RB_UPLOADS, resolution, FLOW_CLEANUP_UPLOADS)
            )
    if not findings:
        findings.append(
            Finding(
                check,
                Severity.OK,
                "; ".join(f"{d.path} {d.free_ratio:.0%} free" for d in evidence.disks),
                RB_UPLOADS,
            )
        )
    return findings


@dataclass(frozen=True)
class PathEntry:
    name: str
    kind: str
    mode: str
    owner: str
    group: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class UploadsEvidence:
    """``ls -la`` of the uploads root: the root's own mode and owner, and its first entries."""

    root: str
    exists: bool
    entry: PathEntry | None
    writable_by_us: bool
    entries: tuple[PathEntry, ...] = ()
    entry_count: int = 0

    def rows(self) -> list[dict[str, Any]]:
        shown = ([self.entry] if self.entry else []) + list(self.entries)
        return [
            {
                "name": "." if e is self.entry else e.name,
                "type": e.kind,
                "mode": e.mode,
                "owner": e.owner,
                "group": e.group,
                "size": e.size,
                "modified": e.modified.isoformat(timespec="seconds"),
            }
            for e in shown
        ]


def _name_of(lookup: Callable[[int], Any], ident: int) -> str:
    try:
        return str(lookup(ident)[0])
    except KeyError:
        return str(ident)


def _path_entry(path: Path, name: str) -> PathEntry:
    st = path.lstat()
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
    return PathEntry(
        name=name,
        kind=kind,
        mode=stat.filemode(st.st_mode) + f" ({stat.S_IMODE(st.st_mode):04o})",
        owner=_name_of(pwd.getpwuid, st.st_uid),
        group=_name_of(grp.getgrgid, st.st_gid),
        size=st.st_size,
        modified=datetime.fromtimestamp(st.st_mtime, UTC),
    )


def uploads_permissions(settings: OpsSettings, shown: int = 20) -> Diagnosis:
    """Runbook 6 "Check uploads directory permissions" (``ls -la backend/uploads/``)."""
    check, title = "uploads-permissions", "Uploads directory"
    root = settings.uploads.root
    if not root.exists():
        evidence = UploadsEvidence(str(root), False, None, False)
        finding = Finding(
            check,
            Severity.CRITICAL,
            f"uploads directory {root} does not exist: uploads fail with 'Cannot save file'",
            RB_UPLOADS,
            "Create it, owned by the user the backend runs as, and mount it where the backend expects it",
            None,
        )
        return Diagnosis(check, title, evidence, (finding,))
    entry = _path_entry(root, str(root))
    entries: list[PathEntry] = []
    count = 0
    if root.is_dir():
        with os.scandir(root) as it:
            for item in it:
                count += 1
                if len(entries) < shown:
                    entries.append(_path_entry(Path(item.path), item.name))
    evidence = UploadsEvidence(
        str(root),
        True,
        entry,
        os.access(root, os.W_OK | os.X_OK),
        tuple(sorted(entries, key=lambda e: e.name)),
        count,
    )
    return Diagnosis(check, title, evidence, tuple(uploads_findings(evidence, root, settings)))


def uploads_findings(evidence: UploadsEvidence, root: Path, settings: OpsSettings) -> list[Finding]:
    check = "uploads-permissions"
    findings: list[Finding] = []
    st = root.stat()
    mode = stat.S_IMODE(st.st_mode)
    owner = evidence.entry.owner if evidence.entry else "?"
    fix = "chown/chmod the uploads directory to the user the backend runs as"
    if not stat.S_ISDIR(st.st_mode):
        return [Finding(check, Severity.CRITICAL, f"{root} is not a directory", RB_UPLOADS, fix, None)]
    expected_owner = settings.uploads.expected_owner
    if expected_owner is not None and owner != expected_owner:
        findings.append(
            Finding(
                check,
                Severity.CRITICAL,
                f"{root} is owned by {owner}, expected {expected_owner}: the backend may not write there",
                RB_UPLOADS,
                fix,
                None,
            )
        )
    expected_mode = settings.uploads.expected_mode
    if expected_mode is not None and mode != int(expected_mode, 8):
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"{root} has mode {mode:04o}, expected {int(expected_mode, 8):04o}",
                RB_UPLOADS,
                fix,
                None,
            )
        )
    if not mode & stat.S_IWUSR:
        findings.append(
            Finding(
                check,
                Severity.CRITICAL,
                f"{root} is not writable by its owner ({mode:04o})",
                RB_UPLOADS,
                fix,
                None,
            )
        )
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"{root} is world-writable ({mode:04o}): anyone on the host can replace uploads",
                RB_UPLOADS,
                fix,
                None,
            )
        )
    if not findings:
        findings.append(
            Finding(
                check,
                Severity.OK,
                f"{root}: mode {mode:04o}, owner {owner}, {evidence.entry_count} entries",
                RB_UPLOADS,
            )
        )
    return findings


# --- Network: TCP reachability and DNS -------------------------------------------------------------


@dataclass(frozen=True)
class TcpProbe:
    name: str
    host: str
    port: int
    ok: bool
    latency_ms: float | None
    error: str | None = None


@dataclass(frozen=True)
class DnsLookup:
    host: str
    addresses: tuple[str, ...]
    latency_ms: float | None
    error: str | None = None


@dataclass(frozen=True)
class NetworkEvidence:
    tcp: tuple[TcpProbe, ...]
    dns: tuple[DnsLookup, ...]

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {
                "kind": "tcp",
                "target": f"{p.name} {p.host}:{p.port}",
                "ok": p.ok,
                "latency_ms": p.latency_ms,
                "result": p.error or "connected",
            }
            for p in self.tcp
        ]
        rows += [
            {
                "kind": "dns",
                "target": d.host,
                "ok": d.error is None,
                "latency_ms": d.latency_ms,
                "result": d.error or ", ".join(d.addresses),
            }
            for d in self.dns
        ]
        return rows


def _with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """Run ``fn`` in a daemon thread; past ``seconds`` raise TimeoutError and leave it behind.

    ``getaddrinfo`` has no timeout of its own and may block for the resolver's full retry cycle.
    """
    result: list[Any] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="diagnose-deadline")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if failure:
        raise failure[0]
    return result[0]


def probe_tcp(name: str, host: str, port: int, timeout: float) -> TcpProbe:
    """``nc -zv host port``: open and close one TCP connection."""
    started = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return TcpProbe(name, host, port, False, None, f"{type(exc).__name__}: {exc}")
    return TcpProbe(name, host, port, True, round((time.perf_counter() - started) * 1000, 2))


def resolve(host: str, timeout: float) -> DnsLookup:
    """DNS resolution of ``host`` (IP literals answer themselves)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return DnsLookup(host, (host,), 0.0)
    started = time.perf_counter()
    try:
        infos = _with_deadline(lambda: socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP), timeout)
    except (OSError, TimeoutError, UnicodeError) as exc:
        return DnsLookup(host, (), None, f"{type(exc).__name__}: {exc}")
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    return DnsLookup(host, addresses, round((time.perf_counter() - started) * 1000, 2))


def network_targets(settings: OpsSettings) -> tuple[list[tuple[str, str, int]], list[str]]:
    """TCP targets (PostgreSQL, Redis) and host names to resolve, from the settings."""
    tcp: list[tuple[str, str, int]] = []
    hosts: list[str] = []
    pg = urlsplit(settings.postgres.dsn.get_secret_value())
    if pg.hostname and not pg.hostname.startswith("/"):
        tcp.append(("postgres", pg.hostname, pg.port or 5432))
        hosts.append(pg.hostname)
    rd = urlsplit(settings.redis.url.get_secret_value())
    if rd.scheme in {"redis", "rediss"} and rd.hostname:
        tcp.append(("redis", rd.hostname, rd.port or 6379))
        hosts.append(rd.hostname)
    for url in settings.health.urls:
        host = urlsplit(url).hostname
        if host:
            hosts.append(host)
    hosts += settings.diagnose.resolve_hosts
    return tcp, list(dict.fromkeys(hosts))


def network(settings: OpsSettings) -> Diagnosis:
    """Performance "Network Issues": TCP reachability of PostgreSQL and Redis, DNS of configured hosts."""
    check, title = "network", "Reachability and DNS"
    timeout = settings.diagnose.network_timeout_seconds
    tcp_targets, hosts = network_targets(settings)
    evidence = NetworkEvidence(
        tcp=tuple(probe_tcp(name, host, port, timeout) for name, host, port in tcp_targets),
        dns=tuple(resolve(host, timeout) for host in hosts),
    )
    return Diagnosis(check, title, evidence, tuple(network_findings(evidence)))


def network_findings(evidence: NetworkEvidence) -> list[Finding]:
    check = "network"
    findings: list[Finding] = []
    for p in evidence.tcp:
        if not p.ok:
            runbook = RB_DATABASE if p.name == "postgres" else RB_REDIS
            findings.append(
                Finding(
                    check,
                    Severity.CRITICAL,
                    f"{p.name} at {p.host}:{p.port} is not reachable over TCP: {p.error}",
                    runbook,
                    f"Restart {p.name} if it is down; check network policies (Kubernetes), security groups"
                    " and firewalls between the app and it",
                    FLOW_RESTART,
                )
            )
    for d in evidence.dns:
        if d.error is not None:
            findings.append(
                Finding(
                    check,
                    Severity.CRITICAL,
                    f"{d.host} does not resolve: {d.error}",
                    RB_NETWORK,
                    "Check DNS resolution (resolver, service names, search domains)",
                    None,
                )
            )
    if not findings:
        findings.append(
            Finding(
                check,
                Severity.OK,
                f"{len(evidence.tcp)} TCP targets reachable, {len(evidence.dns)} host names resolve",
                RB_NETWORK,
            )
        )
    return findings


# --- All checks, each under a deadline --------------------------------------------------------------


def all_diagnostics(
    settings: OpsSettings, long_query_seconds: float | None = None
) -> dict[str, Callable[[], Diagnosis]]:
    """Every check, by name, in the order the report shows them."""
    limits = settings.diagnose
    threshold = long_query_seconds if long_query_seconds is not None else limits.long_query_seconds
    return {
        "postgres-connections": lambda: postgres_connections(settings.postgres, limits),
        "postgres-long-queries": lambda: long_queries(settings.postgres, threshold),
        "postgres-top-statements": lambda: top_statements(settings.postgres, limits),
        "redis-memory": lambda: redis_memory(settings.redis, limits),
        "queues": lambda: queue_states(settings),
        "services": lambda: services(settings),
        "disk": lambda: disk_space(disk_paths(settings), limits),
        "uploads-permissions": lambda: uploads_permissions(settings),
        "network": lambda: network(settings),
    }


_TITLES = {
    "postgres-connections": "PostgreSQL connections",
    "postgres-long-queries": "Long-running queries",
    "postgres-top-statements": "Top statements",
    "redis-memory": "Redis memory",
    "queues": "BullMQ queues",
    "services": "Services",
    "disk": "Disk space",
    "uploads-permissions": "Uploads directory",
    "network": "Reachability and DNS",
}


def run_diagnostic(name: str, settings: OpsSettings, long_query_seconds: float | None = None) -> Diagnosis:
    """Run the check ``name`` under the deadline; an unexpected error or a hang becomes a finding.

    Raises:
        KeyError: ``name`` is no check of :func:`all_diagnostics`.
    """
    check = all_diagnostics(settings, long_query_seconds)[name]
    started = time.perf_counter()
    title = _TITLES.get(name, name)
    try:
        diagnosis: Diagnosis = _with_deadline(check, settings.diagnose.check_deadline_seconds)
    except Exception as exc:
        text = safe_error(exc, settings)
        finding = Finding(
            name,
            Severity.WARNING,
            f"evidence could not be gathered: {text}",
            "Escalation",
            "Gather this evidence by hand (the runbook's commands for this check) and look at the error",
            None,
        )
        return Diagnosis(name, title, None, (finding,), error=text, duration_ms=_ms(started))
    return Diagnosis(
        diagnosis.check,
        diagnosis.title,
        diagnosis.evidence,
        diagnosis.findings,
        None if diagnosis.error is None else mask_text(_one_line(diagnosis.error), _secrets(settings)),
        _ms(started),
    )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


@dataclass(frozen=True)
class DiagnoseReport:
    """Every check's diagnosis, in one report."""

    stack: str
    started_at: datetime
    diagnoses: tuple[Diagnosis, ...]
    triggered_by: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def severity(self) -> Severity:
        return worst([d.severity for d in self.diagnoses])

    def findings(self, at_least: Severity = Severity.INFO) -> list[Finding]:
        """Findings at or above ``at_least``, worst first (then in check order)."""
        found = [f for d in self.diagnoses for f in d.findings if f.severity.rank >= at_least.rank]
        return sorted(found, key=lambda f: -f.severity.rank)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "severity": self.severity.value,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "triggered_by": self.triggered_by,
            "checks": {d.check: d.severity.value for d in self.diagnoses},
            "findings": [f.as_row() for f in self.findings()],
        }


run_diagnostic_task = task(
    run_diagnostic, name="run-diagnostic", cache_policy=NO_CACHE, task_run_name="diagnose-{name}"
)
