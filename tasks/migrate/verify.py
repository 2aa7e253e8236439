"""Evidence after applying: the database is at the plan's target, and every smoke query passes."""

from __future__ import annotations

import time

import psycopg
from psycopg import sql

from tasks import postgres
from tasks.migrate.config import is_head
from tasks.migrate.model import MigrationPlan, SmokeResult, Verification
from tasks.migrate.plan import migration_status
from tasks.reports import elapsed_ms
from tasks.settings import OpsSettings


def run_smoke_queries(settings: OpsSettings) -> list[SmokeResult]:
    """Run each configured smoke query in a read-only transaction under its own statement timeout."""
    timeout_ms = int(settings.migrations.smoke_timeout_seconds * 1000)
    return [_smoke_query(settings, query, timeout_ms) for query in settings.migrations.smoke_queries]


def _smoke_query(settings: OpsSettings, query: str, timeout_ms: int) -> SmokeResult:
    t0 = time.perf_counter()
    try:
        with postgres.connect(
            settings.postgres, autocommit=False, application_name="swagger2mcp-ops-smoke"
        ) as conn:
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
            row = conn.execute(query).fetchone()
            conn.rollback()
    except psycopg.Error as exc:
        return SmokeResult(query, False, None, postgres.safe_error(exc, settings.postgres), elapsed_ms(t0))
    value = None if row is None else row[0]
    ok = row is not None and value is not False and value is not None and value != 0
    error = None if ok else f"returned {'no row' if row is None else repr(value)}; expected a truthy value"
    return SmokeResult(query, ok, None if value is None else str(value)[:200], error, elapsed_ms(t0))


def verify_migrations(settings: OpsSettings, plan: MigrationPlan) -> Verification:
    """Evidence after applying: the database is at the plan's target and every smoke query passes.

    Returns:
        The status read now, whether it is at the target, the smoke results and every problem found
        (``ok`` when there is none).
    """
    problems: list[str] = []
    status = migration_status(settings)
    if status.tool == "alembic":
        at_target = set(status.current) == set(plan.target)
        if not at_target:
            problems.append(
                f"database is at {', '.join(status.current) or 'base'}, expected {', '.join(plan.target)}"
            )
    elif not is_head(plan.requested_target):
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
