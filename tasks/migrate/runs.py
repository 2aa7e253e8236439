"""The durable run marker: a row in ``<runs_schema>.migration_runs`` in the target database.

It is written before anything is applied and closed after verifying. A run killed mid-apply leaves it
behind; the next run finds it and refuses to continue until the recorded backup is restored or an
operator resolves it. Restoring that backup removes the marker too: the backup is taken before the
marker is written.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from typing import Any

import psycopg
from psycopg import sql

from tasks import postgres
from tasks.backup import RestoreResult
from tasks.migrate.config import target_database
from tasks.migrate.model import (
    ApplyRecord,
    InterruptedMigration,
    MigrationError,
    MigrationPlan,
    MigrationRun,
    Verification,
)
from tasks.settings import OpsSettings

RUNS_TABLE = "migration_runs"
# Statuses of a run that left the database in a state nobody verified.
UNFINISHED = ("applying", "verifying", "failed")
_RUN_COLUMNS = (
    "id, status, backup_id, started_at, updated_at, from_revisions, to_revisions, host, pid,"
    " flow_run_id, note"
)
_APPLICATION_NAME = "swagger2mcp-ops-migrate"


def _runs_table(settings: OpsSettings) -> sql.Composed:
    return sql.SQL("{}.{}").format(
        sql.Identifier(settings.migrations.runs_schema), sql.Identifier(RUNS_TABLE)
    )


def _table_exists(conn: psycopg.Connection[Any], settings: OpsSettings) -> bool:
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (f'"{settings.migrations.runs_schema}"."{RUNS_TABLE}"',),
    ).fetchone()
    return bool(exists and exists[0])


def _ensure_runs_table(conn: psycopg.Connection[Any], settings: OpsSettings) -> None:
    conn.execute(
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(settings.migrations.runs_schema))
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " id text PRIMARY KEY, status text NOT NULL, backup_id text,"
            " started_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),"
            " from_revisions text[] NOT NULL DEFAULT '{{}}', to_revisions text[] NOT NULL DEFAULT '{{}}',"
            " host text NOT NULL, pid integer NOT NULL, flow_run_id text, note text)"
        ).format(_runs_table(settings))
    )


def _row_to_run(row: tuple[Any, ...]) -> MigrationRun:
    return MigrationRun(
        id=row[0],
        status=row[1],
        backup_id=row[2],
        started_at=row[3],
        updated_at=row[4],
        from_revisions=tuple(row[5] or ()),
        to_revisions=tuple(row[6] or ()),
        host=row[7],
        pid=row[8],
        flow_run_id=row[9],
        note=row[10],
    )


def unfinished_runs(settings: OpsSettings) -> list[MigrationRun]:
    """Runs that started applying and never reached a verified end (none when the table is absent)."""
    with postgres.connect(settings.postgres, application_name=_APPLICATION_NAME) as conn:
        if not _table_exists(conn, settings):
            return []
        rows = conn.execute(
            sql.SQL("SELECT " + _RUN_COLUMNS + " FROM {} WHERE status = ANY(%s) ORDER BY started_at").format(
                _runs_table(settings)
            ),
            (list(UNFINISHED),),
        ).fetchall()
    return [_row_to_run(r) for r in rows]


def describe_interrupted(runs: list[MigrationRun], database: str) -> str:
    """What the operator is told about unfinished runs, with the restore they can ask for."""
    lines = [f"a previous migration of {database} did not finish; the schema may be half-migrated:"]
    for run in runs:
        lines.append(
            f"- run {run.id}: status {run.status!r} since {run.updated_at:%Y-%m-%d %H:%M:%S %Z}"
            f" (started {run.started_at:%Y-%m-%d %H:%M:%S %Z} by pid {run.pid} on {run.host},"
            f" flow run {run.flow_run_id or 'none'}),"
            f" {','.join(run.from_revisions) or 'base'} -> {','.join(run.to_revisions) or 'latest'},"
            f" backup taken before it: {run.backup_id or 'none recorded'}"
        )
    backups = [r.backup_id for r in runs if r.backup_id]
    if backups:
        lines.append(
            f"Nothing was applied by this run. To go back to the state before that run, restore backup"
            f" {backups[0]}: run migrate-database with restore_interrupted=true (it restores that backup"
            f" and proves the data equals it), or restore-database with backup_id={backups[0]}."
        )
    lines.append(
        "If you checked the schema by hand and it is right, mark the run resolved with"
        f" resolve_interrupted_run={runs[0].id} and run again."
    )
    return "\n".join(lines)


def check_no_interrupted_run(settings: OpsSettings) -> None:
    """Refuse to continue after an unfinished run.

    Raises:
        InterruptedMigration: lists the runs, their backup ids and how to restore or resolve.
    """
    runs = unfinished_runs(settings)
    if runs:
        raise InterruptedMigration(describe_interrupted(runs, target_database(settings)), runs)


def begin_run(
    settings: OpsSettings, plan: MigrationPlan, *, backup_id: str | None, flow_run_id: str | None = None
) -> str:
    """Write the durable "migration in progress" marker; returns the run id. Commits at once."""
    run_id = uuid.uuid4().hex
    with postgres.connect(settings.postgres, application_name=_APPLICATION_NAME) as conn:
        _ensure_runs_table(conn, settings)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, status, backup_id, from_revisions, to_revisions, host, pid, flow_run_id)"
                " VALUES (%s, 'applying', %s, %s, %s, %s, %s, %s)"
            ).format(_runs_table(settings)),
            (
                run_id,
                backup_id,
                list(plan.current),
                list(plan.target),
                socket.gethostname(),
                os.getpid(),
                flow_run_id,
            ),
        )
    return run_id


def mark_run(settings: OpsSettings, run_id: str, status: str, note: str | None = None) -> bool:
    """Set a run's status (``verifying``, ``succeeded``, ``failed``, ``resolved``); False when absent.

    The row is absent after a restore of the backup taken before it: that is the expected end of a
    failed run.
    """
    with postgres.connect(settings.postgres, application_name=_APPLICATION_NAME) as conn:
        if not _table_exists(conn, settings):
            return False
        cur = conn.execute(
            sql.SQL(
                "UPDATE {} SET status = %s, note = coalesce(%s, note), updated_at = now() WHERE id = %s"
            ).format(_runs_table(settings)),
            (status, note, run_id),
        )
        return cur.rowcount == 1


def resolve_run(settings: OpsSettings, run_id: str, note: str) -> MigrationRun:
    """Mark an unfinished run resolved by an operator who checked the schema by hand.

    Raises:
        MigrationError: no unfinished run has that id.
    """
    runs = {r.id: r for r in unfinished_runs(settings)}
    if run_id not in runs:
        raise MigrationError(
            f"no unfinished migration run {run_id!r} in {target_database(settings)}; unfinished runs:"
            f" {', '.join(runs) or 'none'}"
        )
    mark_run(settings, run_id, "resolved", note)
    return runs[run_id]


def finish_run(settings: OpsSettings, record: ApplyRecord, verification: Verification) -> None:
    """Close the marker of a verified run."""
    if record.run_id:
        mark_run(settings, record.run_id, "succeeded" if verification.ok else "failed")


def without_own_tables(settings: OpsSettings, restore: RestoreResult) -> RestoreResult:
    """``restore`` with this project's own tables left out of the kept database's changed tables.

    The marker row is written after the backup, so the kept database always differs from the backup in
    ``<runs_schema>.migration_runs``: that is bookkeeping, not a write of the application an operator
    has to recover from the kept database.
    """
    kept = restore.kept_changes
    if kept is None:
        return restore
    prefix = f"{settings.migrations.runs_schema}."
    differences = [d for d in kept.differences if not d.table.startswith(prefix)]
    if len(differences) == len(kept.differences):
        return restore
    return dataclasses.replace(restore, kept_changes=dataclasses.replace(kept, differences=differences))
