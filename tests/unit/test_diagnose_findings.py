"""Diagnose's pure parts: SQL literal masking, and findings computed from evidence."""

from __future__ import annotations

import string
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks import diagnose as d
from tasks.diagnose import Severity
from tasks.queues import JobInfo, QueueCounts, StalledJob
from tasks.runtime import ResourceUsage, ServiceStatus
from tasks.settings import DiagnoseSettings, ScalingSettings

LIMITS = DiagnoseSettings()


@pytest.mark.parametrize(
    ("query", "masked"),
    [
        (
            "SELECT * FROM users WHERE email = 'a@b.c' AND id = 42",
            "SELECT * FROM users WHERE email = '?' AND id = ?",
        ),
        ("select pg_sleep(30), 'it''s secret'", "select pg_sleep(?), '?'"),
        ("SELECT E'line\\'s\\n', 3.14, 1e10, .5", "SELECT '?', ?, ?, ?"),
        ("SELECT $$body with 'quotes' 12$$, $fn$x$fn$", "SELECT '?', '?'"),
        (
            'SELECT "Col1", t2.c3 FROM "Table 9" t2 WHERE x = $1',
            'SELECT "Col1", t2.c3 FROM "Table 9" t2 WHERE x = $1',
        ),
        ("SELECT 0xFF, B'1010', X'1F'", "SELECT ?, '?', '?'"),
        ("UPDATE t SET token = 'abc123", "UPDATE t SET token = '?'"),  # cut off by track_activity_query_size
        ("SELECT 1 -- note 5\n/* 6 */", "SELECT ? -- note 5\n/* 6 */"),
    ],
)
def test_mask_sql_literals(query: str, masked: str) -> None:
    assert d.mask_sql_literals(query) == masked


@given(st.text(min_size=1, max_size=40), st.integers(min_value=0, max_value=10**12))
def test_no_literal_survives_masking(secret: str, number: int) -> None:
    quoted = secret.replace("'", "''")
    query = f"SELECT name FROM accounts WHERE password = '{quoted}' AND pin = {number}"
    assert d.mask_sql_literals(query) == "SELECT name FROM accounts WHERE password = '?' AND pin = ?"


@given(st.text(alphabet=string.ascii_letters + string.digits + " ,'$\"\\", max_size=60))
def test_masking_never_fails(text: str) -> None:
    out = d.mask_sql_literals(text)
    assert isinstance(out, str)


def test_shown_query_is_one_short_line() -> None:
    shown = d.shown_query("SELECT\n  a,\n  b FROM t WHERE c = 'x' " + "AND d = 1 " * 200)
    assert "\n" not in shown
    assert len(shown) <= 500
    assert shown.startswith("SELECT a, b FROM t WHERE c = '?' AND d = ?")


def _connections(total_idle: int, idle_tx_age: float | None = None) -> d.ConnectionsEvidence:
    groups = [d.ConnectionGroup("idle", "backend", "app", total_idle, 1.0)]
    if idle_tx_age is not None:
        groups.append(d.ConnectionGroup("idle in transaction", "worker", "app", 2, idle_tx_age))
    return d.ConnectionsEvidence(max_connections=100, reserved_connections=3, groups=tuple(groups))


def test_connection_findings_by_ratio() -> None:
    assert d.connection_findings(_connections(10), LIMITS)[0].severity is Severity.OK
    warn = d.connection_findings(_connections(80), LIMITS)[0]
    assert warn.severity is Severity.WARNING
    assert warn.flow == d.FLOW_RESTART
    assert "80 of 97 usable connections" in warn.summary
    assert "backend 80" in warn.summary
    assert d.connection_findings(_connections(95), LIMITS)[0].severity is Severity.CRITICAL


def test_idle_in_transaction_is_a_finding_past_its_threshold() -> None:
    assert len(d.connection_findings(_connections(1, idle_tx_age=5), LIMITS)) == 1
    found = d.connection_findings(_connections(1, idle_tx_age=600), LIMITS)
    assert found[1].severity is Severity.WARNING
    assert "idle in a transaction" in found[1].summary
    assert "worker" in found[1].summary


def _memory(**changes: object) -> d.RedisMemory:
    base = {
        "used": 1_000_000,
        "used_human": "976K",
        "peak": 2_000_000,
        "peak_human": "1.9M",
        "maxmemory": 0,
        "fragmentation_ratio": 1.1,
        "policy": "noeviction",
        "evicted_keys": 0,
    }
    base.update(changes)
    return d.RedisMemory(**base)  # type: ignore[arg-type]


def test_redis_memory_findings() -> None:
    assert [f.severity for f in d.redis_memory_findings(_memory(), LIMITS)] == [Severity.OK]
    near = d.redis_memory_findings(_memory(maxmemory=1_150_000), LIMITS)
    assert near[0].severity is Severity.WARNING
    assert near[0].flow == d.FLOW_CLEAN_JOBS
    full = d.redis_memory_findings(_memory(maxmemory=1_000_000), LIMITS)
    assert full[0].severity is Severity.CRITICAL
    assert "FLUSHDB" in (full[0].resolution or "")
    policy = d.redis_memory_findings(_memory(policy="allkeys-lru"), LIMITS)
    assert policy[0].severity is Severity.WARNING
    assert "noeviction" in policy[0].summary
    evicted = d.redis_memory_findings(_memory(policy="volatile-lru", evicted_keys=7), LIMITS)
    assert evicted[0].severity is Severity.CRITICAL
    assert "7 keys were already evicted" in evicted[0].summary
    # Fragmentation counts only once there is real memory in use.
    assert d.redis_memory_findings(_memory(fragmentation_ratio=3.0), LIMITS)[0].severity is Severity.OK
    frag = d.redis_memory_findings(_memory(fragmentation_ratio=3.0, used=50_000_000), LIMITS)
    assert frag[0].severity is Severity.WARNING


def _queue(name: str, **counts: int) -> QueueCounts:
    return QueueCounts(name=name, counts=counts, is_paused=False)


def test_queue_findings() -> None:
    failed = JobInfo("default", "9", "crawl", "failed", 0, 1, 2, 1, "upstream 503")
    stalled = StalledJob("default", "7", "crawl", 120.0, 1, 0)
    evidence = d.QueuesEvidence(
        counts=(_queue("default", waiting=3, active=1, failed=1), _queue("emails", waiting=5, active=0)),
        workers={"default": 1, "emails": 0},
        stalled=(stalled,),
        failed=(failed,),
        read_at_ms=10_000,
    )
    found = d.queue_findings(evidence, LIMITS)
    by_flow = {(f.severity, f.flow) for f in found}
    assert (Severity.CRITICAL, d.FLOW_RESTART) in by_flow  # stalled, and emails with no worker
    assert (Severity.WARNING, d.FLOW_RETRY) in by_flow
    texts = " ".join(f.summary for f in found)
    assert "1 jobs stuck in active" in texts
    assert "emails: 5 jobs waiting, none active, no worker connected" in texts
    assert "upstream 503 (x1)" in texts
    # Unknown worker count (CLIENT LIST refused) is not "no worker".
    unknown = d.QueuesEvidence((_queue("emails", waiting=5),), {"emails": None}, (), (), 0)
    assert [f.severity for f in d.queue_findings(unknown, LIMITS)] == [Severity.OK]


def test_service_findings() -> None:
    evidence = d.ServicesEvidence(
        runtime="compose",
        services=(
            ServiceStatus("backend", "app:2", desired=1, ready=1, state="running", restarts=5),
            ServiceStatus("worker", "app:2", desired=1, ready=0, state="restarting", restarts=0),
        ),
        usage=(ResourceUsage("backend", cpu_percent=97.0, memory_bytes=512 * 2**20),),
        logs=(d.LogTail("backend", 100, ("FATAL ERROR: JavaScript heap out of memory",)),),
    )
    found = d.service_findings(evidence, ["backend", "worker", "nginx"], LIMITS)
    summaries = {f.summary: f for f in found}
    assert summaries["service nginx is not running at all (not found by the compose runtime)"].severity is (
        Severity.CRITICAL
    )
    worker = summaries["service worker is restarting: 0 of 1 ready"]
    assert worker.flow == d.FLOW_RESTART
    assert worker.runbook == d.RB_WORKER
    assert any("restarted 5 times" in s and f.runbook == d.RB_MEMORY for s, f in summaries.items())
    assert any("97% CPU" in s and f.runbook == d.RB_CPU for s, f in summaries.items())
    assert any("heap out of memory" in s for s in summaries)
    rows = evidence.rows()
    assert rows[0]["memory_mib"] == 512.0
    assert rows[0]["log_matches"] == 1
    none = d.service_findings(d.ServicesEvidence("none", (), (), ()), ["backend"], LIMITS)
    assert [f.severity for f in none] == [Severity.INFO]


def test_high_cpu_names_scale_services_with_a_count_capped_by_the_bounds() -> None:
    scaling = ScalingSettings.model_validate(
        {
            "cpu_target_percent": 60,
            "bounds": {"backend": {"min": 2, "max": 4}, "worker": {"min": 1, "max": 2}},
        }
    )
    evidence = d.ServicesEvidence(
        runtime="kubernetes",
        services=(
            ServiceStatus("backend", "app:2", desired=2, ready=2, state="available"),
            ServiceStatus("worker", "app:2", desired=2, ready=2, state="available"),
            ServiceStatus("api", "app:2", desired=1, ready=1, state="available"),
        ),
        usage=(
            ResourceUsage("backend", cpu_percent=170.0, memory_bytes=None),  # ceil(170 / 60) = 3
            ResourceUsage("worker", cpu_percent=190.0, memory_bytes=None),  # wants 4, max 2
            ResourceUsage("api", cpu_percent=500.0, memory_bytes=None),  # wants 9, no bounds
            ResourceUsage("idle", cpu_percent=10.0, memory_bytes=None),
        ),
        logs=(),
    )
    found = [f for f in d.service_findings(evidence, ["backend"], LIMITS, scaling) if f.runbook == d.RB_CPU]
    by_service = {f.summary.split()[1]: f for f in found}
    assert set(by_service) == {"backend", "worker", "api"}
    assert all(f.flow == d.FLOW_SCALE == "scale-services" for f in found)
    backend = by_service["backend"].resolution or ""
    assert "from 2 to 3 replicas" in backend
    assert (
        """-p replicas='{"backend": 3}' -p dry_run=false (within its bounds: no approval needed)""" in backend
    )
    worker = by_service["worker"].resolution or ""
    assert "already at its max of 2 replicas (4 would give about 60% CPU each)" in worker
    api = by_service["api"].resolution or ""
    assert "from 1 to 9 replicas" in api
    assert "asks for approval: the service has no bounds" in api


def test_scan_log_counts_matching_lines_and_masks_secrets() -> None:
    text = (
        "started\nError: connect ECONNREFUSED postgresql://app:S3cretPw@db:5432/app\nok\n<--- heap limit --->"
    )
    tail = d.scan_log("backend", text, LIMITS.log_patterns, ["S3cretPw"])
    assert tail.lines == 4
    assert len(tail.matches) == 2
    assert "S3cretPw" not in " ".join(tail.matches)


def test_disk_findings_thresholds() -> None:
    gib = 2**30
    evidence = d.DiskEvidence(
        (
            d.DiskSpace("/data", "/data", 100 * gib, 50 * gib),
            d.DiskSpace("/uploads", "/uploads", 100 * gib, 10 * gib),
            d.DiskSpace("/backups", "/backups", 100 * gib, 2 * gib),
        )
    )
    found = d.disk_findings(evidence, LIMITS)
    assert [(f.severity, f.summary.split(":")[0]) for f in found] == [
        (Severity.WARNING, "/uploads"),
        (Severity.CRITICAL, "/backups"),
    ]
    assert {f.flow for f in found} == {d.FLOW_CLEANUP_UPLOADS}


def test_report_orders_findings_worst_first() -> None:
    ok = d.Diagnosis("a", "A", None, (d.Finding("a", Severity.OK, "fine", d.RB_SLOW),))
    bad = d.Diagnosis(
        "b", "B", None, (d.Finding("b", Severity.CRITICAL, "down", d.RB_REDIS, "restart", "x"),)
    )
    info = d.Diagnosis("c", "C", None, (d.Finding("c", Severity.INFO, "fyi", d.RB_DB_LOAD),))
    report = d.DiagnoseReport("s", datetime.now(UTC), (ok, bad, info))
    assert report.severity is Severity.CRITICAL
    assert [f.summary for f in report.findings()] == ["down", "fyi"]
    assert report.as_dict()["checks"] == {"a": "ok", "b": "critical", "c": "info"}


def test_diagnose_settings_validate_thresholds() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="connections_critical_ratio"):
        DiagnoseSettings(connections_warn_ratio=0.9, connections_critical_ratio=0.5)
    with pytest.raises(ValidationError, match="not a regular expression"):
        DiagnoseSettings(log_patterns=["(unclosed"])
