"""Migration settings, plan rendering and the operator's message, without services."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from flows.migrate import MigrationReport, render_markdown, render_plan
from tasks.errors import SettingsError
from tasks.migrate import MigrationPlan, MigrationRun, RevisionStep, describe_interrupted
from tasks.settings import load_settings


def test_command_tool_needs_its_argvs_and_pattern(monkeypatch):
    monkeypatch.setenv("OPS_MIGRATIONS__TOOL", "command")
    monkeypatch.setenv("OPS_MIGRATIONS__APPLY_ARGV", '["npx", "prisma", "migrate", "deploy"]')
    with pytest.raises(SettingsError, match="status_argv, up_to_date_pattern"):
        load_settings()


def test_maintenance_mode_that_cannot_be_turned_off_is_refused(monkeypatch):
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_ON_URL", "http://127.0.0.1:1/on")
    with pytest.raises(SettingsError, match="turned on but not off"):
        load_settings()


@pytest.mark.parametrize("bad", ["x;drop", "1abc", ""])
def test_runs_schema_must_be_an_identifier(monkeypatch, bad):
    monkeypatch.setenv("OPS_MIGRATIONS__RUNS_SCHEMA", bad)
    with pytest.raises(SettingsError, match="runs_schema"):
        load_settings()


def test_bad_pattern_is_refused(monkeypatch):
    monkeypatch.setenv("OPS_MIGRATIONS__UP_TO_DATE_PATTERN", "([")
    with pytest.raises(SettingsError, match="up_to_date_pattern"):
        load_settings()


def test_prisma_style_settings_load(monkeypatch):
    monkeypatch.setenv("OPS_MIGRATIONS__TOOL", "command")
    monkeypatch.setenv("OPS_MIGRATIONS__STATUS_ARGV", '["npx", "prisma", "migrate", "status"]')
    monkeypatch.setenv("OPS_MIGRATIONS__APPLY_ARGV", '["npx", "prisma", "migrate", "deploy"]')
    monkeypatch.setenv("OPS_MIGRATIONS__UP_TO_DATE_PATTERN", "Database schema is up to date")
    settings = load_settings()
    assert settings.migrations.apply_argv[-1] == "deploy"
    assert settings.migrations.database_url_env == "DATABASE_URL"


def _plan() -> MigrationPlan:
    return MigrationPlan(
        tool="alembic",
        database="app",
        current=("a1",),
        target=("a3",),
        steps=(
            RevisionStep("a2", "a1", "add name", "ALTER TABLE users ADD COLUMN name text;"),
            RevisionStep("a3", "a2", "big", "UPDATE t SET x = 1;\n" * 2000),
        ),
    )


def test_plan_shows_sql_per_revision_and_cuts_long_sql():
    text = render_plan(_plan())
    assert "From `a1` to `a3`, 2 revision(s)" in text
    assert "### `a2` add name" in text
    assert "ALTER TABLE users ADD COLUMN name text;" in text
    assert "-- ... (cut; see the run's log)" in text
    assert len(text) < 10_000


def test_report_of_dry_run_names_plan_and_timings():
    report = MigrationReport(stack="s", database="app", tool="alembic", dry_run=True, outcome="dry-run")
    report.plan = _plan()
    report.timings = {"plan": 0.5}
    text = render_markdown(report)
    assert "**dry-run**" in text
    assert "## Timings" in text
    assert "| plan | 0.5 |" in text
    assert report.summary()["pending"] == ["a2", "a3"]


def test_interrupted_message_offers_the_restore_and_the_way_out():
    at = datetime(2026, 11, 28, 2, 15, tzinfo=UTC)
    run = MigrationRun("abc123", "applying", "bk-1", at, at, ("a1",), ("a3",), "ops-host", 4242, "fr-1")
    text = describe_interrupted([run], "app")
    assert "did not finish" in text
    assert "status 'applying'" in text
    assert "a1 -> a3" in text
    assert "pid 4242 on ops-host" in text
    assert "restore_interrupted=true" in text
    assert "restore-database with backup_id=bk-1" in text
    assert "resolve_interrupted_run=abc123" in text


def test_errors_survive_pickling_with_their_evidence():
    import pickle

    from flows.migrate import MigrationFailed
    from tasks.migrate import InterruptedMigration

    failed = pickle.loads(pickle.dumps(MigrationFailed("restored", {"outcome": "failed-restored"})))  # noqa: S301
    assert str(failed) == "restored"
    assert failed.summary == {"outcome": "failed-restored"}
    at = datetime(2026, 11, 28, tzinfo=UTC)
    run = MigrationRun("r", "applying", "bk", at, at, (), ("a1",), "h", 1, None)
    interrupted = pickle.loads(pickle.dumps(InterruptedMigration("stop", [run])))  # noqa: S301
    assert interrupted.runs == [run]


def test_kept_database_changes_leave_out_the_projects_own_tables(monkeypatch):
    from tasks.backup import RestoreResult, TableComparison, TableDifference
    from tasks.migrate import without_own_tables

    monkeypatch.setenv("OPS_MIGRATIONS__RUNS_SCHEMA", "ops_book")
    kept = TableComparison(
        "app__old_1",
        "bk-1",
        tables_compared=3,
        rows_compared=12,
        hashes_compared=3,
        differences=[TableDifference("public.users", 5, 6), TableDifference("ops_book.migration_runs", 0, 1)],
    )
    restore = RestoreResult(
        backup_id="bk-1",
        target_database="app",
        scratch_database="app__restore_1",
        old_database="app__old_1",
        old_kept=True,
        terminated_connections=0,
        comparison=TableComparison("app", "bk-1", 3, 11, 3),
        commands=[],
        duration_seconds=1.0,
        kept_changes=kept,
        kept_open_command="psql app__old_1",
    )
    shown = without_own_tables(load_settings(), restore)
    assert shown.kept_changed_tables == ["public.users"]
    assert not any("ops_book" in line for line in shown.kept_lines())
    # Only the marker changed: the kept database holds no write of the application.
    only_marker = without_own_tables(
        load_settings(), replace(restore, kept_changes=replace(kept, differences=kept.differences[1:]))
    )
    assert only_marker.kept_changed_tables == []
    assert "It holds no row that differs from backup bk-1." in only_marker.kept_lines()
