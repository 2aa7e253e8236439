"""migrate-database and the application's writes, against the real PostgreSQL with a real writer
process inserting a row every 50 ms through the whole run (tests/fixtures/migrations.py: AppWriter).

A failing migration restores the backup. Either the writers were stopped for the window (the writer's
own log shows it refused while maintenance mode was on, and every write it had accepted is in the
database afterwards), or they kept running by the operator's choice and every accepted write is in
the restored database or in the kept one, whose changed tables the report lists.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

import psycopg
import pytest

from tests.fixtures.migrations import (
    ADD_NAME,
    BACKFILL,
    NOT_NULL,
    Revision,
    failing_command_tool,
    snapshot,
    use,
    writer_rows,
)

pytestmark = [pytest.mark.flow, pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def run_flow(**params: Any) -> Any:
    from flows.migrate import migrate_database

    return migrate_database(**params, return_state=True)


def failure_summary(state: Any) -> tuple[str, dict[str, Any]]:
    assert state.is_failed(), state
    with pytest.raises(Exception) as caught:
        state.result()
    return str(caught.value), getattr(caught.value, "summary", {})


def artifact_text(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(key={"any_": [key]}))
    assert found, f"no artifact {key}"
    return str(found[0].data)


def kept_dsn(mg_env: dict[str, Any], kept: str) -> str:
    return mg_env["dsn"].rsplit("/", 1)[0] + "/" + kept


def test_writers_stopped_by_maintenance_hooks_lose_no_write(monkeypatch, mg_env, app_writer):
    use(monkeypatch, failing_command_tool())
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_ON_ARGV", json.dumps(app_writer.on_argv))
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_OFF_ARGV", json.dumps(app_writer.off_argv))
    app_writer.start()
    state = run_flow(dry_run=False, approved=True)  # writes_policy defaults to "stop"
    after_run = len(app_writer.accepted())
    deadline = time.monotonic() + 10
    while len(app_writer.accepted()) < after_run + 5 and time.monotonic() < deadline:
        time.sleep(0.05)  # the writer runs again once maintenance mode is off
    app_writer.stop()

    message, summary = failure_summary(state)
    assert summary["outcome"] == "failed-restored", message
    assert summary["writers"] == {"policy": "stop", "method": "maintenance", "services": []}
    # Proven by the writer's own log: it refused writes while the window was open...
    assert app_writer.refused() > 0
    # ...and every write the database acknowledged is in the database the application uses now.
    accepted = app_writer.accepted()
    assert len(accepted) > after_run, "the writer did not write again after the window"
    assert accepted <= writer_rows(mg_env["dsn"])
    # The replaced database is kept; its only change since the backup is the migration's INSERT (the
    # run marker written after the backup is this project's bookkeeping, not the application's data).
    kept = summary["kept_database"]
    assert kept
    assert kept.startswith(mg_env["database"] + "__old_")
    assert summary["kept_changed_tables"] == ["public.users"]
    assert kept in message
    assert "public.users" in message
    with psycopg.connect(kept_dsn(mg_env, kept)) as conn:
        row = conn.execute("SELECT count(*) FROM users WHERE email = 'migration@example.com'").fetchone()
    assert row == (1,)
    with psycopg.connect(mg_env["dsn"]) as conn:
        row = conn.execute("SELECT count(*) FROM users WHERE email = 'migration@example.com'").fetchone()
    assert row == (0,)


def test_keep_running_writes_are_in_the_kept_database_and_listed(monkeypatch, mg_env, app_writer):
    use(monkeypatch, failing_command_tool())
    app_writer.start()
    state = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    time.sleep(0.5)
    app_writer.stop()

    message, summary = failure_summary(state)
    assert summary["outcome"] == "failed-restored", message
    assert summary["writers"]["policy"] == "keep-running"
    assert app_writer.refused() == 0
    kept = summary["kept_database"]
    assert kept
    accepted = app_writer.accepted()
    current, in_kept = writer_rows(mg_env["dsn"]), writer_rows(kept_dsn(mg_env, kept))
    # Every accepted write is somewhere; the ones the restore took out of service are in the kept
    # database, and the report lists their table.
    assert accepted <= current | in_kept
    only_kept = accepted - current
    assert only_kept, "no write landed between the backup and the restore: the test proves nothing"
    assert only_kept <= in_kept
    assert set(summary["kept_changed_tables"]) == {"public.users", "public.writer_events"}
    report = artifact_text("migration-teststack")
    assert kept in report
    assert "`public.writer_events`" in report
    assert "Writers kept running" in message


def test_kept_database_opens_read_only_in_psql_and_pg_dump(monkeypatch, mg_env, tmp_path):
    use(monkeypatch, failing_command_tool(sleep=0))
    _, summary = failure_summary(run_flow(dry_run=False, approved=True, writes_policy="keep-running"))
    kept = summary["kept_database"]
    dsn = kept_dsn(mg_env, kept)
    assert "psql '" in summary["kept_open_command"]
    assert kept in summary["kept_open_command"]
    read = subprocess.run(
        ["psql", dsn, "-At", "-c", "SELECT count(*) FROM users"], capture_output=True, text=True, timeout=30
    )
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == "201"  # 200 seeded + the failed migration's row
    write = subprocess.run(
        ["psql", dsn, "-v", "ON_ERROR_STOP=1", "-c", "INSERT INTO users (email) VALUES ('x')"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert write.returncode != 0
    assert "read-only transaction" in write.stderr
    dump = subprocess.run(
        ["pg_dump", "-Fc", "-t", "users", "-f", str(tmp_path / "kept.dump"), dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dump.returncode == 0, dump.stderr
    assert (tmp_path / "kept.dump").stat().st_size > 0


def test_refuses_before_anything_without_a_way_to_stop_writers(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME]))
    before = snapshot(mg_env["dsn"])
    state = run_flow(dry_run=False, approved=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="MAINTENANCE_ON_ARGV") as caught:
        state.result()
    assert 'writes_policy="keep-running"' in str(caught.value)
    assert "Nothing was done" in str(caught.value)
    assert snapshot(mg_env["dsn"]) == before
    assert not (mg_env["tmp"] / "backups").exists() or not list((mg_env["tmp"] / "backups").rglob("*"))
    # A dry run still shows the plan and says the real run would refuse.
    dry = run_flow()
    assert dry.is_completed(), dry.message
    assert dry.result()["pending"] == ["r1_add_name"]
    assert "a real run would refuse" in artifact_text("migration-teststack")


def test_approval_wait_precedes_the_backup(monkeypatch, mg_env, alembic_env):
    from prefect.flow_runs import resume_flow_run

    from tasks import backup
    from tasks.settings import load_settings

    use(monkeypatch, alembic_env([ADD_NAME]))
    states: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: states.update(run=run_flow(dry_run=False, writes_policy="keep-running"))
    )
    thread.start()
    try:
        paused = _paused("migrate-database")
        # While the run waits for approval, no backup exists yet.
        assert backup.list_backups(load_settings()) == []
        approved_at = time.time()
        resume_flow_run(paused, run_input={"approve": True, "approver": "test", "reason": "test migration"})
    finally:
        thread.join(timeout=120)
    state = states["run"]
    assert state.is_completed(), state.message
    summary = state.result()
    (manifest,) = backup.list_backups(load_settings())
    assert manifest.id == summary["backup_id"]
    assert manifest.started_at.timestamp() >= approved_at
    assert summary["timings"]["approval"] > 0


def _paused(flow_name: str, timeout: float = 90) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for run in client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                ),
                limit=20,
            ):
                if run.state is not None and run.state.is_paused():
                    return run.id
            time.sleep(0.3)
    raise AssertionError(f"no {flow_name} run paused within {timeout}s")


def test_target_revision_is_honoured_and_shown(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME, BACKFILL, NOT_NULL]))
    dry = run_flow(target="r2_backfill")
    assert dry.result()["pending"] == ["r1_add_name", "r2_backfill"]
    assert "target `r2_backfill`" in artifact_text("migration-teststack-plan")
    state = run_flow(dry_run=False, approved=True, target="r2_backfill", writes_policy="keep-running")
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["outcome"] == "migrated"
    assert summary["target"] == "r2_backfill"
    assert summary["applied"] == ["r1_add_name", "r2_backfill"]
    with psycopg.connect(mg_env["dsn"]) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("r2_backfill",)]
    # Already past an earlier target: nothing pending, never a downgrade.
    assert run_flow(target="r1_add_name").result()["outcome"] == "up-to-date"
    unknown = run_flow(target="no_such_rev")
    assert unknown.is_failed()
    with pytest.raises(Exception, match="not a revision"):
        unknown.result()


def test_command_tool_target_uses_its_own_argument(monkeypatch, mg_env, tmp_path):
    use(monkeypatch, failing_command_tool())
    refused = run_flow(dry_run=False, approved=True, target="20260102", writes_policy="keep-running")
    assert refused.is_failed()
    with pytest.raises(Exception, match="APPLY_TARGET_ARGV"):
        refused.result()
    seen = tmp_path / "target-seen"
    record = f"import sys; open({str(seen)!r}, 'w').write(sys.argv[1])"
    monkeypatch.setenv("OPS_MIGRATIONS__APPLY_TARGET_ARGV", json.dumps(["python3", "-c", record, "{target}"]))
    monkeypatch.setenv("OPS_MIGRATIONS__UP_TO_DATE_PATTERN", "pending")  # status always matches after
    monkeypatch.setenv("OPS_MIGRATIONS__STATUS_ARGV", json.dumps(["python3", "-c", "print('x')"]))
    state = run_flow(dry_run=False, approved=True, target="20260102", writes_policy="keep-running")
    assert state.is_completed(), state.message
    assert seen.read_text() == "20260102"
    assert state.result()["target"] == "20260102"


def test_writers_stopped_by_scaling_to_zero_through_the_runtime(monkeypatch, mg_env, alembic_env, kube_stack):
    from kubernetes import client

    def replicas() -> dict[str, int]:
        apps = client.AppsV1Api(kube_stack.api())
        return {
            d.metadata.name: d.spec.replicas
            for d in apps.list_namespaced_deployment(kube_stack.namespace).items
        }

    for key, value in {
        "OPS_RUNTIME__KIND": "kubernetes",
        "OPS_RUNTIME__KUBERNETES__API_URL": kube_stack.url,
        "OPS_RUNTIME__KUBERNETES__NAMESPACE": kube_stack.namespace,
        "OPS_RUNTIME__RELEASE_STORE": str(mg_env["tmp"] / "releases"),
        "OPS_RUNTIME__READY_TIMEOUT_SECONDS": "20",
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
    }.items():
        monkeypatch.setenv(key, value)
    # The revision waits on a lock this test holds, so the window is open exactly as long as needed.
    gate = 4343
    gated = Revision(
        "r1_gated",
        "add column once the gate opens",
        f"op.execute('SELECT pg_advisory_lock({gate})')\n"
        f"op.execute('SELECT pg_advisory_unlock({gate})')\n"
        "op.execute('ALTER TABLE users ADD COLUMN name text')",
    )
    use(monkeypatch, alembic_env([gated]))
    assert replicas() == {"backend": 1, "worker": 1}
    states: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: states.update(run=run_flow(dry_run=False, approved=True)))
    with psycopg.connect(mg_env["dsn"], autocommit=True) as gate_conn:
        gate_conn.execute("SELECT pg_advisory_lock(%s)", (gate,))
        thread.start()
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                waiting = gate_conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event = 'advisory' AND query LIKE %s",
                    (f"%pg_advisory_lock({gate})%",),
                ).fetchone()
                if waiting[0]:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the run never reached its gated revision")
            during = replicas()
        finally:
            gate_conn.execute("SELECT pg_advisory_unlock(%s)", (gate,))
            thread.join(timeout=120)
    assert during == {"backend": 0, "worker": 0}
    state = states["run"]
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["outcome"] == "migrated"
    assert summary["writers"] == {"policy": "stop", "method": "runtime", "services": ["backend", "worker"]}
    assert replicas() == {"backend": 1, "worker": 1}
    assert any("scaled back" in e for e in summary["writer_events"])
