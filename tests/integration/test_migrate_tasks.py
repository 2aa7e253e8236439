"""The plain migration functions against the real PostgreSQL (and the real knex CLI)."""

from __future__ import annotations

import logging

import psycopg
import pytest

from tasks import migrate, postgres
from tasks.errors import LockBusy
from tasks.settings import load_settings
from tests.fixtures.migrations import (
    ADD_NAME,
    BACKFILL,
    BAD_SQL,
    NOT_NULL,
    snapshot,
    use,
    write_knex_project,
)

pytestmark = pytest.mark.integration


def test_plan_is_per_revision_sql_and_changes_nothing(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME, BACKFILL, NOT_NULL]))
    before = snapshot(mg_env["dsn"])
    plan = migrate.plan_migrations(load_settings())
    assert [s.revision for s in plan.steps] == ["r1_add_name", "r2_backfill", "r3_not_null"]
    assert plan.current == ()
    assert plan.target == ("r3_not_null",)
    first, second, third = (s.sql or "" for s in plan.steps)
    assert "CREATE TABLE alembic_version" in first
    assert "ALTER TABLE users ADD COLUMN name text" in first
    assert "split_part" not in first
    assert "UPDATE users SET name = split_part(email, '@', 1)" in second
    assert "SET NOT NULL" in third
    assert "SET NOT NULL" not in second
    assert snapshot(mg_env["dsn"]) == before


def test_apply_one_at_a_time_names_the_failing_revision_and_marks_the_run(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME, BAD_SQL, NOT_NULL], ini=True))
    settings = load_settings()
    plan = migrate.plan_migrations(settings)
    probe = logging.getLogger("tasks.migrate.probe")
    with pytest.raises(
        migrate.MigrationError, match=r"revision r2_bad \(broken backfill\) failed after 1 of 3"
    ):
        migrate.apply_migrations(settings, plan, backup_id="bk-test")
    # The ini's fileConfig ran inside; loggers that existed before are still enabled.
    assert not probe.disabled
    status = migrate.migration_status(settings)
    assert status.current == ("r1_add_name",)
    assert status.pending == ("r2_bad", "r3_not_null")
    runs = migrate.unfinished_runs(settings)
    assert [(r.status, r.backup_id) for r in runs] == [("failed", "bk-test")]
    with pytest.raises(migrate.InterruptedMigration, match="backup bk-test"):
        migrate.check_no_interrupted_run(settings)
    migrate.resolve_run(settings, runs[0].id, "checked by hand")
    migrate.check_no_interrupted_run(settings)


def test_smoke_queries_pass_fail_and_are_read_only(monkeypatch, mg_env):
    monkeypatch.setenv(
        "OPS_MIGRATIONS__SMOKE_QUERIES",
        '["SELECT count(*) FROM users", "SELECT count(*) FROM users WHERE id < 0",'
        ' "SELECT * FROM nope", "DELETE FROM projects RETURNING 1"]',
    )
    results = migrate.run_smoke_queries(load_settings())
    assert [r.ok for r in results] == [True, False, False, False]
    assert results[0].value == "200"
    assert "expected a truthy value" in (results[1].error or "")
    assert "nope" in (results[2].error or "")
    assert "read-only" in (results[3].error or "")
    with psycopg.connect(mg_env["dsn"]) as conn:
        assert conn.execute("SELECT count(*) FROM projects").fetchone() == (50,)


def test_second_lock_holder_waits_then_names_the_first(mg_env):
    settings = load_settings()
    with (
        migrate.migration_lock(settings, owner="migrate-database run-one"),
        pytest.raises(LockBusy, match=r"held by migrate-database run-one .*\(database session pid \d+"),
        migrate.migration_lock(settings, owner="migrate-database run-two"),
    ):
        pytest.fail("two holders")
    # Released: a third run gets it at once, and is the one holder.
    key = postgres.advisory_lock_key(migrate.lock_name(settings))
    with (
        migrate.migration_lock(settings, owner="migrate-database run-three"),
        postgres.connect(settings.postgres, database="postgres") as conn,
    ):
        holders = postgres.advisory_lock_holders(conn, key)
    assert len(holders) == 1
    assert holders[0].application_name.startswith("swagger2mcp-ops migrate-database run-three")


def test_knex_status_plan_apply_verify(monkeypatch, mg_env, knex_modules, tmp_path):
    use(
        monkeypatch,
        write_knex_project(
            tmp_path / "backend",
            knex_modules,
            {
                "20260101000000_tags.js": """
                    exports.up = (knex) => knex.schema.createTable('tags', (t) => { t.increments('id'); });
                    exports.down = (knex) => knex.schema.dropTable('tags');
                """
            },
        ),
    )
    settings = load_settings()
    plan = migrate.plan_migrations(settings)
    assert plan.pending
    assert "Found 1 Pending Migration" in plan.status_output
    assert "20260101000000_tags.js" in plan.status_output
    record = migrate.apply_migrations(settings, plan, backup_id=None)
    assert record.commands[0].endswith("migrate:latest --knexfile knexfile.js")
    # The DSN reached the tool through its environment, never its argv or the record.
    assert mg_env["dsn"] not in " ".join(record.commands)
    verification = migrate.verify_migrations(settings, plan)
    assert verification.ok, verification.problems
    migrate.finish_run(settings, record, verification)
    assert migrate.unfinished_runs(settings) == []
    assert not migrate.plan_migrations(settings).pending
