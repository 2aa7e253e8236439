"""Status and plan: where the database is, and exactly what applying up to a target would do.

Alembic's plan is the SQL ``upgrade --sql`` would run, captured per revision; a command tool's plan is
its status output (a regular expression on it says whether anything is pending) and its apply command.
"""

from __future__ import annotations

import re

from tasks.errors import ParameterError
from tasks.migrate import alembic_env
from tasks.migrate.config import is_head, require_configured, run_tool, target_argv, target_database
from tasks.migrate.model import HEAD, MigrationPlan, MigrationStatus, RevisionStep
from tasks.settings import OpsSettings


def require_target(settings: OpsSettings, target: str) -> None:
    """Fail before any side effect when ``target`` cannot be honoured by the configured tool.

    Raises:
        ParameterError: an empty target; a command tool with a target other than ``head`` and no
            ``migrations.apply_target_argv``; an Alembic revision the app's scripts do not have.
    """
    if not target or not target.strip():
        raise ParameterError("target must name a revision, or be 'head' (every pending migration)")
    if is_head(target):
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
    alembic_env.resolve_target(alembic_env.script_directory(settings), target)


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
        result = run_tool(settings, settings.migrations.status_argv, "status", check=False)
        output = (result.stdout + "\n" + result.stderr).strip()
        up_to_date = bool(re.search(settings.migrations.up_to_date_pattern or "$^", output))
        return MigrationStatus("command", database, (), (), (), up_to_date, output)
    script = alembic_env.script_directory(settings)
    current = alembic_env.current_revisions(settings)
    heads = tuple(sorted(script.get_heads()))
    pending = tuple(r.revision for r in alembic_env.pending_revisions(script, current))
    return MigrationStatus("alembic", database, current, heads, pending, not pending)


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
        return _command_plan(settings, status, target)
    return _alembic_plan(settings, status, target)


def _command_plan(settings: OpsSettings, status: MigrationStatus, target: str) -> MigrationPlan:
    head = is_head(target)
    steps: tuple[RevisionStep, ...] = (
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


def _alembic_plan(settings: OpsSettings, status: MigrationStatus, target: str) -> MigrationPlan:
    script = alembic_env.script_directory(settings)
    upper = "heads" if is_head(target) else alembic_env.resolve_target(script, target)
    steps: list[RevisionStep] = []
    for rev in alembic_env.pending_revisions(script, status.current, upper):
        down = alembic_env.down_revision(rev)
        # A merge revision has several parents; its SQL is rendered from the first one.
        start = (down or "base").split(",")[0]
        sql_text = alembic_env.offline_sql(settings, start, rev.revision)
        steps.append(RevisionStep(rev.revision, down, rev.doc or "", sql_text))
    return MigrationPlan(
        tool="alembic",
        database=status.database,
        current=status.current,
        target=status.heads if upper == "heads" else (upper,),
        steps=tuple(steps),
        apply_command="alembic upgrade " + " ".join(s.revision for s in steps),
        requested_target=target,
    )
