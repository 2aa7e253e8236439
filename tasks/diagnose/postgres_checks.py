"""PostgreSQL checks: connections against ``max_connections``, long-running queries, and the top
statements of ``pg_stat_statements`` (runbook Common Issues 1 and 5, Performance "High Database
Load"). A server that refuses the connection is a critical finding, never an exception."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from tasks import postgres
from tasks.diagnose.model import (
    FLOW_RESTART,
    RB_DATABASE,
    RB_DB_LOAD,
    RB_SLOW,
    Diagnosis,
    Finding,
    Severity,
)
from tasks.diagnose.sql_text import shown_query
from tasks.settings import DiagnoseSettings, PostgresSettings


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


def _statements_query(conn: psycopg.Connection, schema: str) -> sql.Composed:
    """The top-statements query for this server (PostgreSQL 13 renamed the time columns)."""
    version = int(conn.execute("SELECT current_setting('server_version_num')::int").fetchone()[0])  # type: ignore[index]
    mean, total = ("mean_exec_time", "total_exec_time") if version >= 130000 else ("mean_time", "total_time")
    return sql.SQL(
        "SELECT calls, {mean}, {total}, rows, query FROM {view}"
        " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " ORDER BY {mean} DESC LIMIT %s"
    ).format(
        mean=sql.Identifier(mean),
        total=sql.Identifier(total),
        view=sql.Identifier(schema, "pg_stat_statements"),
    )


def _read_top_statements(
    conn: psycopg.Connection, database: str, limits: DiagnoseSettings
) -> TopStatementsEvidence:
    """The top statements, or why they cannot be read (extension not installed, or not loaded)."""
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
        return TopStatementsEvidence(False, note, ())
    try:
        rows = conn.execute(_statements_query(conn, ext[0]), (limits.top_statements,)).fetchall()
    except psycopg.errors.ObjectNotInPrerequisiteState:
        note = (
            "pg_stat_statements is installed but not loaded: add it to shared_preload_libraries"
            " and restart PostgreSQL"
        )
        return TopStatementsEvidence(False, note, ())
    return TopStatementsEvidence(
        True,
        None,
        tuple(StatementStat(int(r[0]), float(r[1]), float(r[2]), int(r[3]), shown_query(r[4])) for r in rows),
    )


def _top_statements_findings(evidence: TopStatementsEvidence, limits: DiagnoseSettings) -> list[Finding]:
    check = "postgres-top-statements"
    if not evidence.available:
        # The note says what to install or load: an info, since the check itself could not run.
        return [
            Finding(check, Severity.INFO, evidence.note or "pg_stat_statements is not available", RB_DB_LOAD)
        ]
    slow = [s for s in evidence.statements if s.mean_ms >= limits.slow_statement_mean_ms]
    if not slow:
        summary = f"no statement's mean time is over {limits.slow_statement_mean_ms:g} ms"
        return [Finding(check, Severity.OK, summary, RB_DB_LOAD)]
    return [
        Finding(
            check,
            Severity.WARNING,
            f"{len(slow)} statements average over {limits.slow_statement_mean_ms:g} ms; slowest"
            f" {slow[0].mean_ms:.0f} ms over {slow[0].calls} calls: {slow[0].query[:120]}",
            RB_DB_LOAD,
            "Add indexes if needed; optimize the queries; consider read replicas for read-heavy load",
            None,
        )
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
            evidence = _read_top_statements(conn, database, limits)
    except psycopg.Error as exc:
        return Diagnosis(check, title, None, (_unreachable_postgres(check, exc, pg),), error=str(exc))
    return Diagnosis(check, title, evidence, tuple(_top_statements_findings(evidence, limits)))
