"""Schema migrations: status, plan, apply and verify, for Alembic (in-process) or any migration CLI.

- Alembic runs in-process through ``alembic.command`` with a ``Config`` built from settings and the
  application's own migration environment (its ``env.py``). The plan is the SQL ``upgrade --sql``
  would run, captured per revision; apply runs one revision at a time so the report says which one
  failed and how long each took.
- A command-based tool (``npx prisma migrate deploy``, ``knex migrate:latest``...) runs through the
  command runner with argvs from settings; its status output is the plan, and a regular expression
  on that output says whether anything is pending.
- A durable marker (a row in ``<runs_schema>.migration_runs`` in the target database) is written
  before applying and updated after verifying. A run killed mid-apply leaves it behind; the next run
  finds it and refuses to continue until the recorded backup is restored or an operator resolves it.
  Restoring that backup removes the marker too: the backup is taken before the marker is written.
- One migration at a time per database: a PostgreSQL advisory lock on the maintenance database (it
  survives the target being replaced by a restore), naming the holder when busy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from tasks import backup as backups
from tasks import locks, postgres
from tasks.commands import CommandResult, run_command
from tasks.errors import CheckFailed, OpsError, ParameterError, SettingsError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings

RUNS_TABLE = "migration_runs"
# The target that means "every pending migration" (Alembic's head; a command tool's plain apply).
HEAD = "head"
# Statuses of a run that left the database in a state nobody verified.
UNFINISHED = ("applying", "verifying", "failed")


class MigrationError(OpsError):
    """A migration step failed."""


class InterruptedMigration(OpsError):
    """A previous run did not finish (killed, or failed without a completed restore)."""

    def __init__(self, message: str, runs: list[MigrationRun]) -> None:
        super().__init__(message)
        self.runs = runs

    def __reduce__(self) -> tuple[Any, ...]:
        # Failed states carry the exception; it must survive pickling with its runs.
        return (type(self), (self.args[0], self.runs))


class MigrationVerifyFailed(CheckFailed):
    """Migrations ran but the database is not at the target, or a smoke query failed."""


# --------------------------------------------------------------------------------------------------
# Typed results


@dataclass(frozen=True)
class RevisionStep:
    """One pending revision: its id, parent, message and the SQL ``upgrade --sql`` emits for it."""

    revision: str
    down_revision: str | None
    description: str
    sql: str | None = None


@dataclass(frozen=True)
class MigrationStatus:
    """Where the database is: current and head revisions (Alembic) or the tool's status output."""

    tool: str
    database: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: tuple[str, ...]
    up_to_date: bool
    output: str = ""


@dataclass(frozen=True)
class MigrationPlan:
    """What applying would do: the pending revisions with their SQL, or the tool's status output."""

    tool: str
    database: str
    current: tuple[str, ...]
    target: tuple[str, ...]
    steps: tuple[RevisionStep, ...]
    status_output: str = ""
    apply_command: str = ""
    requested_target: str = HEAD

    @property
    def pending(self) -> bool:
        return bool(self.steps)


@dataclass(frozen=True)
class AppliedStep:
    """One revision (or the tool's one apply command) that ran, with its duration."""

    revision: str
    seconds: float


@dataclass(frozen=True)
class ApplyRecord:
    """Change record of an apply: what ran, in what order, how long, and the commands (masked)."""

    run_id: str
    tool: str
    database: str
    from_revisions: tuple[str, ...]
    to_revisions: tuple[str, ...]
    steps: tuple[AppliedStep, ...]
    commands: tuple[str, ...] = ()
    changed: bool = True
    seconds: float = 0.0


@dataclass(frozen=True)
class SmokeResult:
    """One smoke query: passed when it ran without error and returned a row whose first value is truthy."""

    query: str
    ok: bool
    value: str | None
    error: str | None
    ms: float


@dataclass(frozen=True)
class Verification:
    """Evidence after applying: the status against the plan's target and the smoke queries."""

    status: MigrationStatus
    at_target: bool
    smoke: tuple[SmokeResult, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class MigrationRun:
    """A row of the durable run marker table."""

    id: str
    status: str
    backup_id: str | None
    started_at: datetime
    updated_at: datetime
    from_revisions: tuple[str, ...]
    to_revisions: tuple[str, ...]
    host: str
    pid: int
    flow_run_id: str | None
    note: str | None = None


@dataclass(frozen=True)
class MaintenanceChange:
    """Change record of turning the application's maintenance mode on or off."""

    mode: str
    configured: bool
    changed: bool
    method: str
    detail: str
    commands: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------------
# Connections and settings


def _dsn(settings: OpsSettings) -> str:
    return settings.postgres.dsn.get_secret_value()


def _secrets(settings: OpsSettings) -> list[str]:
    dsn = _dsn(settings)
    return [dsn, postgres.libpq_dsn(dsn), urlsplit(dsn).password or ""]


def target_database(settings: OpsSettings) -> str:
    """The database the migrations run against."""
    return postgres.database_name(_dsn(settings))


def lock_name(settings: OpsSettings) -> str:
    """The advisory lock name guarding migrations of the target database."""
    return settings.migrations.lock_key or f"swagger2mcp-ops:migrate:{target_database(settings)}"


def require_configured(settings: OpsSettings) -> None:
    """Fail before any side effect when the migration tool is not configured.

    Raises:
        SettingsError: names the missing settings.
    """
    cfg = settings.migrations
    if cfg.tool == "alembic":
        if not cfg.script_location and not cfg.alembic_config:
            raise SettingsError(
                "migrations.tool is 'alembic' but neither migrations.script_location nor"
                " migrations.alembic_config is set; set OPS_MIGRATIONS__SCRIPT_LOCATION to the app's"
                " Alembic directory (the one with env.py)"
            )
        if cfg.alembic_config and not Path(cfg.alembic_config).is_file():
            raise SettingsError(f"migrations.alembic_config {cfg.alembic_config} is not a readable file")
        location = cfg.script_location
        if location and ":" not in location and not (Path(location) / "env.py").is_file():
            raise SettingsError(f"migrations.script_location {location} has no env.py")
    elif cfg.cwd is not None and not Path(cfg.cwd).is_dir():
        raise SettingsError(f"migrations.cwd {cfg.cwd} is not a directory")


def _is_head(target: str) -> bool:
    return target in (HEAD, "heads")


def require_target(settings: OpsSettings, target: str) -> None:
    """Fail before any side effect when ``target`` cannot be honoured by the configured tool.

    Raises:
        ParameterError: an empty target; a command tool with a target other than ``head`` and no
            ``migrations.apply_target_argv``; an Alembic revision the app's scripts do not have.
    """
    if not target or not target.strip():
        raise ParameterError("target must name a revision, or be 'head' (every pending migration)")
    if _is_head(target):
        return
    if settings.migrations.tool == "command":
        if not settings.migrations.apply_target_argv:
            raise ParameterError(
                f"target {target!r} was asked but the migration tool takes no target here: set"
                " OPS_MIGRATIONS__APPLY_TARGET_ARGV to its apply command with '{target}' where the target"
                ' goes (e.g. ["npx", "node-pg-migrate", "up", "{target}"]), or use target=\'head\'.'
                " Nothing was done"
            )
        return
    _resolve_alembic_target(_script(settings), target)


def _resolve_alembic_target(script: Any, target: str) -> str:
    from alembic.util import CommandError

    try:
        revision = script.get_revision(target)
    except CommandError as exc:
        raise ParameterError(f"target {target!r} is not a revision of the app's migrations: {exc}") from None
    if revision is None:
        raise ParameterError(f"target {target!r} is not a revision of the app's migrations")
    return str(revision.revision)


def target_argv(settings: OpsSettings, target: str) -> list[str]:
    """The command tool's apply argv for ``target`` (the plain apply for ``head``)."""
    if _is_head(target):
        return list(settings.migrations.apply_argv)
    return [a.replace("{target}", target) for a in settings.migrations.apply_target_argv]


@contextlib.contextmanager
def migration_lock(settings: OpsSettings, *, owner: str) -> Iterator[str]:
    """Hold the migration lock of the target database, and its restore lock, for the block.

    The locks live on the maintenance database: a restore replaces the target database (its
    sessions are terminated), and the locks must survive that. Holding the restore lock too
    (:func:`tasks.backups.database_lock_name`) keeps a manual restore from replacing the database in
    the middle of a migration, and a migration from starting during a restore; the run's own restore
    is told the lock is held.

    Args:
        owner: the operation taking it; a second run is told this flow run's name and full id, the
            host and the process (:class:`tasks.locks.Holder`).

    Raises:
        LockBusy: another run held it for ``migrations.lock_timeout_seconds``; names the holder.
    """
    name = lock_name(settings)
    holder = locks.Holder.current(owner)
    conn = postgres.connect(
        settings.postgres,
        database=settings.backup.maintenance_database,
        application_name=holder.application_name(),
    )
    timeout = settings.migrations.lock_timeout_seconds
    database_lock = backups.database_lock_name(target_database(settings))
    with (
        conn,
        postgres.advisory_lock(conn, name, timeout, holder=holder.describe()),
        postgres.advisory_lock(conn, database_lock, timeout, holder=holder.describe()),
    ):
        run_logger(__name__).info("holding locks %s and the database's restore lock", name)
        yield name


# --------------------------------------------------------------------------------------------------
# The durable run marker


def _runs_table(settings: OpsSettings) -> sql.Composed:
    return sql.SQL("{}.{}").format(
        sql.Identifier(settings.migrations.runs_schema), sql.Identifier(RUNS_TABLE)
    )


def _ensure_runs_table(conn: psycopg.Connection, settings: OpsSettings) -> None:
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


_RUN_COLUMNS = (
    "id, status, backup_id, started_at, updated_at, from_revisions, to_revisions, host, pid,"
    " flow_run_id, note"
)


def unfinished_runs(settings: OpsSettings) -> list[MigrationRun]:
    """Runs that started applying and never reached a verified end (none when the table is absent)."""
    with postgres.connect(settings.postgres, application_name="swagger2mcp-ops-migrate") as conn:
        exists = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (f'"{settings.migrations.runs_schema}"."{RUNS_TABLE}"',),
        ).fetchone()
        if not exists or not exists[0]:
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
    with postgres.connect(settings.postgres, application_name="swagger2mcp-ops-migrate") as conn:
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
    with postgres.connect(settings.postgres, application_name="swagger2mcp-ops-migrate") as conn:
        exists = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (f'"{settings.migrations.runs_schema}"."{RUNS_TABLE}"',),
        ).fetchone()
        if not exists or not exists[0]:
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


# --------------------------------------------------------------------------------------------------
# Alembic


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Keep the process's logging as it was around the app's env.py.

    The stock env.py calls ``logging.config.fileConfig`` on the ini file, which disables every logger
    that already exists (Prefect's run loggers among them) and replaces the root handlers.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = {
        name: (lg.disabled, lg.level, list(lg.handlers), lg.propagate)
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, (disabled, lvl, hdlrs, propagate) in loggers.items():
            lg = logging.getLogger(name)
            lg.disabled, lg.propagate = disabled, propagate
            lg.setLevel(lvl)
            lg.handlers[:] = hdlrs


def _alembic_url(settings: OpsSettings) -> str:
    """SQLAlchemy URL for the app's env.py, naming the session and bounding each statement."""
    base = postgres.sqlalchemy_url(_dsn(settings))
    options = f"-c statement_timeout={int(settings.migrations.apply_timeout_seconds * 1000)}"
    sep = "&" if urlsplit(base).query else "?"
    return f"{base}{sep}application_name=swagger2mcp-ops-alembic&options={quote(options)}"


def alembic_config(settings: OpsSettings, *, output: io.StringIO | None = None) -> Any:
    """An ``alembic.config.Config`` for the app's migration environment, pointed at the target DSN."""
    from alembic.config import Config

    cfg_settings = settings.migrations
    config = Config(
        file_=str(cfg_settings.alembic_config) if cfg_settings.alembic_config else None,
        output_buffer=output,
        stdout=io.StringIO(),
    )
    if cfg_settings.script_location:
        config.set_main_option("script_location", cfg_settings.script_location)
    # ConfigParser interpolation: a literal '%' (URL-encoded password, options) must be doubled.
    config.set_main_option("sqlalchemy.url", _alembic_url(settings).replace("%", "%%"))
    return config


def _script(settings: OpsSettings) -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(settings))


def _alembic_current(settings: OpsSettings) -> tuple[str, ...]:
    """Current revisions, read through the app's env.py (its version table, its connection setup)."""
    from alembic.runtime.environment import EnvironmentContext

    config = alembic_config(settings)
    script = _script(settings)
    heads: list[str] = []

    def read(_rev: Any, context: Any) -> list[Any]:
        heads.extend(context.get_current_heads())
        return []

    with _logging_kept(), EnvironmentContext(config, script, fn=read, dont_mutate=True):
        script.run_env()
    return tuple(sorted(heads))


def _pending_revisions(script: Any, current: tuple[str, ...], upper: str = "heads") -> list[Any]:
    """Pending revisions up to ``upper`` (a revision id, or every head), from the oldest to the newest.

    A target the database already reached (an ancestor of, or equal to, a current revision) has
    nothing pending: this never plans a downgrade.
    """
    if upper != "heads" and current:
        applied = {r.revision for r in script.iterate_revisions(current, "base")}
        if upper in applied:
            return []
    lower = current if current else None
    revs = list(script.iterate_revisions(upper, lower))
    revs.reverse()
    return revs


def _down(rev: Any) -> str | None:
    down = rev.down_revision
    if isinstance(down, tuple | list):
        return ",".join(down) if down else None
    return down


def status_is_read_only(settings: OpsSettings) -> bool:
    """Whether reading the status leaves the database untouched (Alembic's does; a CLI's may not:
    knex creates its bookkeeping tables on ``migrate:list``)."""
    return settings.migrations.tool == "alembic"


def migration_status(settings: OpsSettings) -> MigrationStatus:
    """The database's migration status with the configured tool.

    Raises:
        SettingsError: the tool is not configured.
        CommandError: the command tool's status command could not run.
    """
    require_configured(settings)
    database = target_database(settings)
    if settings.migrations.tool == "command":
        result = _run_tool(settings, settings.migrations.status_argv, "status", check=False)
        output = (result.stdout + "\n" + result.stderr).strip()
        up_to_date = bool(re.search(settings.migrations.up_to_date_pattern or "$^", output))
        return MigrationStatus("command", database, (), (), (), up_to_date, output)
    script = _script(settings)
    current = _alembic_current(settings)
    heads = tuple(sorted(script.get_heads()))
    pending = tuple(r.revision for r in _pending_revisions(script, current))
    return MigrationStatus("alembic", database, current, heads, pending, not pending)


def _offline_sql(settings: OpsSettings, start: str, revision: str) -> str:
    from alembic import command

    buffer = io.StringIO()
    config = alembic_config(settings, output=buffer)
    with _logging_kept():
        command.upgrade(config, f"{start}:{revision}", sql=True)
    return buffer.getvalue()


def plan_migrations(settings: OpsSettings, target: str = HEAD) -> MigrationPlan:
    """The exact plan up to ``target``: per pending revision the SQL ``upgrade --sql`` emits, or the
    tool's status and the apply command (the tool's own target argument when ``target`` is not head).

    Nothing in the database changes (Alembic; a command tool's status command may write its own
    bookkeeping tables).

    Raises:
        ParameterError: ``target`` cannot be honoured (see :func:`require_target`).
    """
    require_target(settings, target)
    status = migration_status(settings)
    if status.tool == "command":
        head = _is_head(target)
        steps = (
            ()
            if status.up_to_date
            else (RevisionStep("(pending)" if head else target, None, "tool's pending migrations"),)
        )
        return MigrationPlan(
            tool="command",
            database=status.database,
            current=(),
            target=() if head else (target,),
            steps=steps,
            status_output=status.output,
            apply_command=" ".join(target_argv(settings, target)),
            requested_target=target,
        )
    script = _script(settings)
    upper = "heads" if _is_head(target) else _resolve_alembic_target(script, target)
    steps = []
    for rev in _pending_revisions(script, status.current, upper):
        down = _down(rev)
        # A merge revision has several parents; its SQL is rendered from the first one.
        start = (down or "base").split(",")[0]
        steps.append(
            RevisionStep(rev.revision, down, rev.doc or "", _offline_sql(settings, start, rev.revision))
        )
    return MigrationPlan(
        tool="alembic",
        database=status.database,
        current=status.current,
        target=status.heads if upper == "heads" else (upper,),
        steps=tuple(steps),
        apply_command="alembic upgrade " + " ".join(s.revision for s in steps),
        requested_target=target,
    )


def _run_tool(settings: OpsSettings, argv: list[str], what: str, *, check: bool) -> CommandResult:
    cfg = settings.migrations
    env = dict(cfg.env)
    if cfg.database_url_env:
        env[cfg.database_url_env] = postgres.libpq_dsn(_dsn(settings))
    timeout = cfg.apply_timeout_seconds if what == "apply" else cfg.status_timeout_seconds
    return run_command(argv, timeout=timeout, cwd=cfg.cwd, env=env, secrets=_secrets(settings), check=check)


def apply_migrations(
    settings: OpsSettings,
    plan: MigrationPlan,
    *,
    backup_id: str | None,
    flow_run_id: str | None = None,
    run_id: str | None = None,
) -> ApplyRecord:
    """Apply exactly the planned revisions (or run the tool's apply command), marker first.

    The durable marker is written before anything is applied and set to ``verifying`` after; on an
    error it is set to ``failed``. Either way the caller verifies or restores.

    Args:
        plan: from :func:`plan_migrations`; an empty plan applies nothing.
        backup_id: the backup taken just before, recorded in the marker for the operator.
        run_id: an existing marker (from :func:`begin_run`); a new one is written when None.

    Raises:
        MigrationError: a revision or the apply command failed (names which).
    """
    logger = run_logger(__name__)
    if not plan.pending:
        return ApplyRecord(
            run_id or "", plan.tool, plan.database, plan.current, plan.current, (), changed=False
        )
    run_id = run_id or begin_run(settings, plan, backup_id=backup_id, flow_run_id=flow_run_id)
    started = time.monotonic()
    steps: list[AppliedStep] = []
    commands: list[str] = []
    current = plan.current
    try:
        if plan.tool == "command":
            t0 = time.monotonic()
            argv = target_argv(settings, plan.requested_target)
            result = _run_tool(settings, argv, "apply", check=False)
            commands.append(result.command_line)
            if not result.ok:
                raise MigrationError(
                    f"{result.command_line} exited {result.returncode}; the database may be partly"
                    f" migrated. Output:\n{(result.stderr or result.stdout)[-3000:]}"
                )
            steps.append(AppliedStep(result.command_line, round(time.monotonic() - t0, 3)))
        else:
            from alembic import command

            for step in plan.steps:
                t0 = time.monotonic()
                logger.info("applying revision %s (%s)", step.revision, step.description)
                commands.append(f"alembic upgrade {step.revision}")
                try:
                    with _logging_kept():
                        command.upgrade(alembic_config(settings), step.revision)
                except Exception as exc:
                    raise MigrationError(
                        f"revision {step.revision} ({step.description}) failed after"
                        f" {len(steps)} of {len(plan.steps)} revisions were applied:"
                        f" {postgres.safe_error(exc, settings.postgres)}"
                    ) from exc
                steps.append(AppliedStep(step.revision, round(time.monotonic() - t0, 3)))
                logger.info("revision %s applied in %.2fs", step.revision, steps[-1].seconds)
            current = plan.target
    except BaseException as exc:
        with contextlib.suppress(psycopg.Error):
            mark_run(settings, run_id, "failed", str(exc)[:2000])
        raise
    mark_run(settings, run_id, "verifying")
    return ApplyRecord(
        run_id=run_id,
        tool=plan.tool,
        database=plan.database,
        from_revisions=plan.current,
        to_revisions=current,
        steps=tuple(steps),
        commands=tuple(commands),
        changed=True,
        seconds=round(time.monotonic() - started, 3),
    )


# --------------------------------------------------------------------------------------------------
# Verification


def run_smoke_queries(settings: OpsSettings) -> list[SmokeResult]:
    """Run each configured smoke query in a read-only transaction under its own statement timeout."""
    results = []
    timeout_ms = int(settings.migrations.smoke_timeout_seconds * 1000)
    for query in settings.migrations.smoke_queries:
        t0 = time.perf_counter()
        try:
            with postgres.connect(
                settings.postgres, autocommit=False, application_name="swagger2mcp-ops-smoke"
            ) as conn:
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
                row = conn.execute(query).fetchone()  # type: ignore[arg-type]
                conn.rollback()
        except psycopg.Error as exc:
            results.append(
                SmokeResult(query, False, None, postgres.safe_error(exc, settings.postgres), _ms(t0))
            )
            continue
        value = None if row is None else row[0]
        ok = row is not None and value is not False and value is not None and value != 0
        error = (
            None if ok else f"returned {'no row' if row is None else repr(value)}; expected a truthy value"
        )
        results.append(SmokeResult(query, ok, None if value is None else str(value)[:200], error, _ms(t0)))
    return results


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def verify_migrations(settings: OpsSettings, plan: MigrationPlan) -> Verification:
    """Evidence after applying: the database is at the plan's target and every smoke query passes."""
    problems: list[str] = []
    status = migration_status(settings)
    if status.tool == "alembic":
        at_target = set(status.current) == set(plan.target)
        if not at_target:
            problems.append(
                f"database is at {', '.join(status.current) or 'base'}, expected {', '.join(plan.target)}"
            )
    elif not _is_head(plan.requested_target):
        # The tool's status says "nothing pending" only at the latest migration, not at a target:
        # the apply command's exit code and the smoke queries are the evidence here.
        at_target = True
    else:
        at_target = status.up_to_date
        if not at_target:
            problems.append(
                f"the tool's status does not match {settings.migrations.up_to_date_pattern!r}:"
                f" {status.output[-500:]}"
            )
    smoke = run_smoke_queries(settings)
    problems.extend(f"smoke query {s.query!r} failed: {s.error}" for s in smoke if not s.ok)
    return Verification(status, at_target, tuple(smoke), tuple(problems))


def finish_run(settings: OpsSettings, record: ApplyRecord, verification: Verification) -> None:
    """Close the marker of a verified run."""
    if record.run_id:
        mark_run(settings, record.run_id, "succeeded" if verification.ok else "failed")


# --------------------------------------------------------------------------------------------------
# Maintenance mode (the scheduled-downtime flow)


def set_maintenance_mode(settings: OpsSettings, on: bool, *, dry_run: bool) -> MaintenanceChange:
    """Turn the application's maintenance mode on or off with the configured command or HTTP call.

    With nothing configured, nothing happens and the record says so (the app stays reachable).

    Raises:
        CommandError: the command failed. httpx.HTTPError / MigrationError: the HTTP call failed.
    """
    cfg = settings.migrations
    mode = "on" if on else "off"
    argv = cfg.maintenance_on_argv if on else cfg.maintenance_off_argv
    url = cfg.maintenance_on_url if on else cfg.maintenance_off_url
    if not argv and not url:
        return MaintenanceChange(
            mode,
            configured=False,
            changed=False,
            method="none",
            detail="no maintenance mode is configured (migrations.maintenance_*): the application stays"
            " reachable during the window",
        )
    if argv:
        if dry_run:
            return MaintenanceChange(mode, True, False, "command", "dry run: would run", (" ".join(argv),))
        result = run_command(argv, timeout=cfg.maintenance_timeout_seconds, secrets=_secrets(settings))
        return MaintenanceChange(
            mode, True, True, "command", f"exited {result.returncode}", (result.command_line,)
        )
    assert url is not None
    from tasks.secrets import mask_url

    shown = f"{cfg.maintenance_http_method} {mask_url(url)}"
    if dry_run:
        return MaintenanceChange(mode, True, False, "http", "dry run: would call", (shown,))
    import httpx

    response = httpx.request(cfg.maintenance_http_method, url, timeout=cfg.maintenance_timeout_seconds)
    if not response.is_success:
        raise MigrationError(
            f"maintenance mode {mode}: {shown} answered HTTP {response.status_code}; check the endpoint"
        )
    return MaintenanceChange(mode, True, True, "http", f"HTTP {response.status_code}", (shown,))


# --------------------------------------------------------------------------------------------------
# Prefect task wrappers

migration_status_task = task(migration_status, name="migration-status", cache_policy=NO_CACHE)
check_no_interrupted_run_task = task(
    check_no_interrupted_run, name="check-interrupted-migration", cache_policy=NO_CACHE
)
plan_migrations_task = task(plan_migrations, name="plan-migrations", cache_policy=NO_CACHE)
apply_migrations_task = task(apply_migrations, name="apply-migrations", cache_policy=NO_CACHE)
verify_migrations_task = task(verify_migrations, name="verify-migrations", cache_policy=NO_CACHE, retries=1)
run_smoke_queries_task = task(run_smoke_queries, name="smoke-queries", cache_policy=NO_CACHE)
finish_run_task = task(finish_run, name="finish-migration-run", cache_policy=NO_CACHE, retries=2)
resolve_run_task = task(resolve_run, name="resolve-migration-run", cache_policy=NO_CACHE)
set_maintenance_mode_task = task(
    set_maintenance_mode, name="set-maintenance-mode", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5
)
