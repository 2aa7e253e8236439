"""Diagnose's PostgreSQL evidence on real servers: the shared one (connections, a long query opened by
the test) and a private cluster with pg_stat_statements preloaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from pydantic import SecretStr

from tasks import diagnose as d
from tasks.diagnose import Severity
from tasks.settings import DiagnoseSettings, PostgresSettings
from tests.fixtures.core import PG_ADMIN_DSN
from tests.fixtures.diag_services import DIAG_CLOSED_PORT


def pg(dsn: str) -> PostgresSettings:
    return PostgresSettings(dsn=SecretStr(dsn))


@pytest.fixture
def held_connections(pg_database: tuple[str, str]) -> Iterator[list[psycopg.Connection]]:
    """Three connections of application "diag-test-app": two idle, one idle in a transaction."""
    _, dsn = pg_database
    conns = [psycopg.connect(dsn, application_name="diag-test-app", autocommit=True) for _ in range(3)]
    conns[2].autocommit = False
    conns[2].execute("SELECT 1")  # opens the transaction and leaves it open
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()


def test_connections_by_state_and_application(
    pg_database: tuple[str, str], held_connections: list[psycopg.Connection]
) -> None:
    name, dsn = pg_database
    time.sleep(0.6)
    limits = DiagnoseSettings(
        connections_warn_ratio=0.01, connections_critical_ratio=0.02, idle_in_transaction_warn_seconds=0.5
    )
    diagnosis = d.postgres_connections(pg(dsn), limits)
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.ConnectionsEvidence)
    mine = {
        (g.state, g.count) for g in evidence.groups if g.application == "diag-test-app" and g.database == name
    }
    assert mine == {("idle", 2), ("idle in transaction", 1)}
    assert evidence.max_connections >= 10
    assert evidence.total >= 4  # ours plus the diagnosing connection
    critical = diagnosis.findings[0]
    assert critical.severity is Severity.CRITICAL
    assert critical.flow == d.FLOW_RESTART
    assert "max_connections" in critical.summary
    stuck = [f for f in diagnosis.findings if "idle in a transaction" in f.summary]
    assert len(stuck) == 1
    assert "diag-test-app" in stuck[0].summary
    rows = diagnosis.rows()
    assert {"state", "application", "database", "connections"} <= set(rows[0])


@pytest.fixture
def long_query(pg_database: tuple[str, str]) -> Iterator[int]:
    """A query that runs (pg_sleep) in its own connection and thread; cancelled at the end."""
    _, dsn = pg_database
    conn = psycopg.connect(dsn, application_name="diag-long-query", autocommit=True)
    pid = conn.info.backend_pid
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute("SELECT pg_sleep(60), 'card-4111-1111' AS secret, 987654 AS pin")
        except psycopg.errors.QueryCanceled:
            pass
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield pid
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
        thread.join(timeout=10)
        conn.close()
        assert not errors, errors


def test_long_query_is_reported_with_literals_masked(pg_database: tuple[str, str], long_query: int) -> None:
    _, dsn = pg_database
    deadline = time.monotonic() + 10
    while True:
        diagnosis = d.long_queries(pg(dsn), 1.0)
        assert isinstance(diagnosis.evidence, d.LongQueriesEvidence)
        found = [q for q in diagnosis.evidence.queries if q.pid == long_query]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found, "the running pg_sleep query was not reported"
    query = found[0]
    assert query.duration_seconds >= 1.0
    assert query.application == "diag-long-query"
    assert "pg_sleep(?)" in query.query
    assert "4111" not in query.query
    assert "987654" not in query.query
    assert diagnosis.findings[0].severity is Severity.WARNING
    assert diagnosis.findings[0].runbook == d.RB_SLOW
    # A threshold above its runtime: nothing reported.
    quiet = d.long_queries(pg(dsn), 3600)
    assert quiet.rows() == []
    assert quiet.findings[0].severity is Severity.OK


def test_top_statements_says_when_extension_is_missing(pg_database: tuple[str, str]) -> None:
    name, dsn = pg_database
    diagnosis = d.top_statements(pg(dsn), DiagnoseSettings())
    assert diagnosis.rows() == []
    finding = diagnosis.findings[0]
    assert finding.severity is Severity.INFO
    assert f"not installed in database {name}" in finding.summary
    assert "shared_preload_libraries" in finding.summary


def test_top_statements_from_pg_stat_statements(diag_postgres: str) -> None:
    with psycopg.connect(diag_postgres, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")
        conn.execute("CREATE TABLE IF NOT EXISTS diag_items (id int, label text)")
        for i in range(3):
            conn.execute("INSERT INTO diag_items VALUES (%s, %s)", (i, f"item-{i}"))
        for _ in range(2):
            conn.execute("SELECT pg_sleep(0.25)")
    diagnosis = d.top_statements(
        pg(diag_postgres), DiagnoseSettings(slow_statement_mean_ms=200, top_statements=5)
    )
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.TopStatementsEvidence)
    assert evidence.available
    slowest = evidence.statements[0]
    assert "pg_sleep" in slowest.query
    assert slowest.calls == 2
    assert slowest.mean_ms >= 240
    assert [s.mean_ms for s in evidence.statements] == sorted(
        (s.mean_ms for s in evidence.statements), reverse=True
    )
    assert len(evidence.statements) <= 5
    assert diagnosis.findings[0].severity is Severity.WARNING
    assert diagnosis.findings[0].runbook == d.RB_DB_LOAD
    assert not any("item-" in s.query for s in evidence.statements)


def test_unreachable_postgres_is_a_critical_finding_without_the_password() -> None:
    settings = pg(f"postgresql://app:HiddenPw@127.0.0.1:{DIAG_CLOSED_PORT}/app")
    for check in (
        d.postgres_connections(settings, DiagnoseSettings()),
        d.long_queries(settings, 5),
        d.top_statements(settings, DiagnoseSettings()),
    ):
        assert check.evidence is None
        finding = check.findings[0]
        assert finding.severity is Severity.CRITICAL
        assert finding.flow == d.FLOW_RESTART
        assert "HiddenPw" not in finding.summary
        assert "Restart the database" in (finding.resolution or "")
