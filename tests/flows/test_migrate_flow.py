"""migrate-database under the Prefect harness, against the real PostgreSQL (and the real knex CLI).

Every failure case ends with the database equal to the snapshot taken before the run, checked by an
independent snapshot (tests/fixtures/migrate.py), not only by the flow's own comparison.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fixtures.migrations import (
    ADD_NAME,
    BACKFILL,
    BAD_SQL,
    CONCURRENT_INDEX_FAILS,
    NOT_NULL,
    Revision,
    snapshot,
    use,
    write_knex_project,
)

pytestmark = [pytest.mark.flow, pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def revision_of(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('alembic_version')").fetchone()[0] is None:
            return []
        return [r[0] for r in conn.execute("SELECT version_num FROM alembic_version").fetchall()]


def run_flow(**params: Any) -> Any:
    """A migrate-database run. Real runs here have no maintenance mode or runtime to stop writers
    with (and no writer), so they pass writes_policy="keep-running" explicitly."""
    from flows.migrate import migrate_database

    return migrate_database(**params, return_state=True)


def assert_restored(
    state: Any, before: dict[str, object], dsn: str, what: str, *, also_there: tuple[str, ...] = ()
) -> None:
    """The run failed, restored, and the database equals ``before`` (plus ``also_there`` tables)."""
    assert state.is_failed(), state
    message = state.message or ""
    with pytest.raises(Exception, match=what) as caught:
        state.result()
    assert "restored and the data matches" in str(caught.value)
    after = snapshot(dsn)
    assert set(also_there) <= set(after)
    after = {name: value for name, value in after.items() if name not in also_there}
    assert after == before, f"data after restore differs from before the run ({message})"


def test_happy_path_migrates_verifies_and_reports(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME, BACKFILL, NOT_NULL], ini=True))
    monkeypatch.setenv(
        "OPS_MIGRATIONS__SMOKE_QUERIES",
        '["SELECT count(*) = 200 FROM users WHERE name IS NOT NULL", "SELECT 1 FROM projects LIMIT 1"]',
    )
    state = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["outcome"] == "migrated"
    assert summary["pending"] == ["r1_add_name", "r2_backfill", "r3_not_null"]
    assert summary["applied"] == summary["pending"]
    assert summary["backup_id"]
    assert {"plan", "backup", "apply", "verify"} <= set(summary["timings"])
    assert revision_of(mg_env["dsn"]) == ["r3_not_null"]
    with psycopg.connect(mg_env["dsn"]) as conn:
        assert conn.execute("SELECT count(*) FROM users WHERE name = 'user7'").fetchone() == (1,)
        marker = conn.execute("SELECT status, backup_id FROM swagger2mcp_ops.migration_runs").fetchall()
    assert marker == [("succeeded", summary["backup_id"])]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts(
            artifact_filter=__import__(
                "prefect.client.schemas.filters", fromlist=["ArtifactCollectionFilter"]
            ).ArtifactCollectionFilter(key={"any_": ["migration-teststack"]})
        )[0]
    text = artifact.data
    assert summary["backup_id"] in text
    assert "UPDATE users SET name = split_part(email, '@', 1)" in text  # the plan's SQL per revision
    assert "### `r2_backfill`" in text
    assert "## Timings" in text
    assert "**migrated**" in text

    again = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    assert again.is_completed()
    assert again.result()["outcome"] == "up-to-date"
    assert again.result()["backup_id"] is None


def test_dry_run_plans_and_changes_nothing(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME, BACKFILL]))
    before = snapshot(mg_env["dsn"])
    state = run_flow()
    assert state.is_completed(), state.message
    assert state.result()["outcome"] == "dry-run"
    assert state.result()["pending"] == ["r1_add_name", "r2_backfill"]
    assert snapshot(mg_env["dsn"]) == before
    assert not list((mg_env["tmp"] / "backups").rglob("*.json"))


def test_middle_revision_with_bad_sql_is_restored_and_proven(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME, BAD_SQL, NOT_NULL]))
    before = snapshot(mg_env["dsn"])
    state = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    assert_restored(state, before, mg_env["dsn"], "revision r2_bad")
    assert revision_of(mg_env["dsn"]) == []


def test_concurrent_index_failing_after_commits_is_restored(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME, BACKFILL, CONCURRENT_INDEX_FAILS]))
    before = snapshot(mg_env["dsn"])
    state = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    assert_restored(state, before, mg_env["dsn"], "r3_cic")
    # Nothing of the two committed revisions nor the invalid index is left.
    assert revision_of(mg_env["dsn"]) == []
    with psycopg.connect(mg_env["dsn"]) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'users_created_uq'"
        ).fetchone() == (0,)


def test_failing_smoke_query_restores(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME, BACKFILL]))
    monkeypatch.setenv("OPS_MIGRATIONS__SMOKE_QUERIES", '["SELECT count(*) FROM users WHERE name IS NULL"]')
    before = snapshot(mg_env["dsn"])
    state = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    assert_restored(state, before, mg_env["dsn"], "smoke query")
    assert revision_of(mg_env["dsn"]) == []


def test_killed_apply_is_detected_and_offered_restore(monkeypatch, mg_env, alembic_env):
    sleeping = Revision("r2_slow", "slow backfill", "op.execute('SELECT pg_sleep(60)')")
    use(monkeypatch, alembic_env([ADD_NAME, sleeping, NOT_NULL]))
    before = snapshot(mg_env["dsn"])
    from tasks import backup
    from tasks.settings import load_settings

    manifest = backup.create_backup(load_settings(), verify="catalog")
    # The apply runs in its own process, under the migration lock, as the flow would run it.
    script = (
        "import sys\n"
        "from tasks import migrate\n"
        "from tasks.settings import load_settings\n"
        "s = load_settings()\n"
        "with migrate.migration_lock(s, owner='doomed-run'):\n"
        "    migrate.apply_migrations(s, migrate.plan_migrations(s), backup_id=sys.argv[1])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, manifest.id],
        cwd=Path(__file__).resolve().parents[2],
        env=dict(os.environ),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        with psycopg.connect(mg_env["dsn"], autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()"
                ).fetchone()
                if row[0]:
                    break
                assert proc.poll() is None, "the apply process ended before reaching the slow revision"
                time.sleep(0.1)
            else:
                pytest.fail("the slow revision never started")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert revision_of(mg_env["dsn"]) == ["r1_add_name"]  # half-migrated

    state = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    assert state.is_failed()
    with pytest.raises(Exception, match="did not finish") as caught:
        state.result()
    text = str(caught.value)
    assert manifest.id in text
    assert "restore_interrupted=true" in text
    assert revision_of(mg_env["dsn"]) == ["r1_add_name"]  # it did not continue

    dry = run_flow(restore_interrupted=True)
    assert dry.is_completed()
    assert dry.result()["outcome"] == "dry-run"
    assert revision_of(mg_env["dsn"]) == ["r1_add_name"]

    restored = run_flow(dry_run=False, approved=True, writes_policy="keep-running", restore_interrupted=True)
    assert restored.is_completed(), restored.message
    summary = restored.result()
    assert summary["outcome"] == "restored-interrupted"
    assert summary["backup_id"] == manifest.id
    assert summary["data_matches_backup"] is True
    assert snapshot(mg_env["dsn"]) == before


def test_two_runs_at_once_one_applies_the_other_names_the_holder(monkeypatch, mg_env, alembic_env):
    # The first run's revision waits on a lock this test holds, so it is mid-apply for exactly as
    # long as the test wants, without guessing at sleeps.
    gate = 4242
    gated = Revision(
        "r1_gated",
        "add column once the gate opens",
        f"op.execute('SELECT pg_advisory_lock({gate})')\n"
        f"op.execute('SELECT pg_advisory_unlock({gate})')\n"
        "op.execute('ALTER TABLE users ADD COLUMN name text')",
    )
    use(monkeypatch, alembic_env([gated, BACKFILL]))
    states: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: states.update(
            first=run_flow(dry_run=False, approved=True, writes_policy="keep-running")
        )
    )
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
                pytest.fail("the first run never reached its gated revision")
            second = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
        finally:
            gate_conn.execute("SELECT pg_advisory_unlock(%s)", (gate,))
            thread.join(timeout=120)
    assert second.is_failed()
    with pytest.raises(
        Exception, match=r"held by flow run '[^']+' \(id [0-9a-f-]{36}\) of migrate-database"
    ) as e:
        second.result()
    assert str(states["first"].state_details.flow_run_id) in str(e.value)
    assert states["first"].is_completed(), states["first"].message
    assert states["first"].result()["applied"] == ["r1_gated", "r2_backfill"]
    with psycopg.connect(mg_env["dsn"]) as conn:
        runs = conn.execute("SELECT status FROM swagger2mcp_ops.migration_runs").fetchall()
    assert runs == [("succeeded",)]


KNEX_OK = {
    "20260101000000_widgets.js": """
        exports.up = (knex) => knex.schema.createTable('widgets', (t) => {
          t.increments('id');
          t.integer('owner_id').references('users.id');
          t.string('name').notNullable();
        });
        exports.down = (knex) => knex.schema.dropTable('widgets');
    """,
    "20260102000000_seed_widgets.js": """
        exports.up = (knex) =>
          knex.raw("INSERT INTO widgets (owner_id, name) SELECT id, 'w' || id FROM users");
        exports.down = (knex) => knex('widgets').del();
    """,
}

KNEX_BROKEN = {
    **KNEX_OK,
    "20260103000000_broken.js": """
        exports.up = (knex) => knex.raw('ALTER TABLE widgets ADD CONSTRAINT one_per_owner UNIQUE (nme)');
        exports.down = () => Promise.resolve();
    """,
}


def test_command_tool_knex_through_the_flow(monkeypatch, mg_env, knex_modules):
    use(monkeypatch, write_knex_project(mg_env["tmp"] / "backend", knex_modules, KNEX_OK))
    monkeypatch.setenv("OPS_MIGRATIONS__SMOKE_QUERIES", '["SELECT count(*) = 200 FROM widgets"]')
    dry = run_flow()
    assert dry.is_completed()
    assert dry.result()["outcome"] == "dry-run"

    state = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["outcome"] == "migrated"
    assert summary["backup_id"]
    with psycopg.connect(mg_env["dsn"]) as conn:
        assert conn.execute("SELECT count(*) FROM widgets").fetchone() == (200,)
        assert conn.execute("SELECT count(*) FROM knex_migrations").fetchone() == (2,)
    assert (
        run_flow(dry_run=False, approved=True, writes_policy="keep-running").result()["outcome"]
        == "up-to-date"
    )


def test_command_tool_failure_is_restored(monkeypatch, mg_env, knex_modules):
    use(monkeypatch, write_knex_project(mg_env["tmp"] / "backend", knex_modules, KNEX_BROKEN))
    before = snapshot(mg_env["dsn"])
    state = run_flow(dry_run=False, approved=True, writes_policy="keep-running")
    # knex's status command (the plan, before the approval) creates its bookkeeping tables; the backup
    # is taken after the approval, so they are in it and stay, empty of this run's migrations.
    bookkeeping = ("public.knex_migrations", "public.knex_migrations_lock")
    assert_restored(state, before, mg_env["dsn"], "knex", also_there=bookkeeping)
    with psycopg.connect(mg_env["dsn"]) as conn:
        assert conn.execute("SELECT count(*) FROM knex_migrations").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('widgets')").fetchone() == (None,)


def test_rejected_approval_applies_nothing(monkeypatch, mg_env, alembic_env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    use(monkeypatch, alembic_env([ADD_NAME]))
    before = snapshot(mg_env["dsn"])
    states: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: states.update(run=run_flow(dry_run=False, writes_policy="keep-running"))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 90
        paused = None
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline and paused is None:
                # Filter on the server: the session's harness holds every test's runs.
                for run in client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["migrate-database"])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                    ),
                    limit=20,
                ):
                    if run.state is not None and run.state.is_paused() and run.name and run.flow_id:
                        paused = run
                time.sleep(0.5)
        assert paused is not None, "the run never paused for approval"
        resume_flow_run(paused.id, run_input={"approve": False, "approver": "test", "reason": "not tonight"})
    finally:
        thread.join(timeout=120)
    state = states["run"]
    assert state.is_failed()
    with pytest.raises(Exception, match="not applied: rejected by test: not tonight"):
        state.result()
    assert snapshot(mg_env["dsn"]) == before
