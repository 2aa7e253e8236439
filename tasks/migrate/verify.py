"""Evidence after applying: the database is at the plan's target, and every smoke query passes."""

from __future__ import annotations

from tasks import postgres
from tasks.migrate.config import is_head
from tasks.migrate.model import MigrationPlan, SmokeResult, Verification
from tasks.migrate.plan import migration_status
from tasks.settings import OpsSettings


def run_smoke_queries(settings: OpsSettings) -> list[SmokeResult]:
    """Run each configured smoke query in a read-only transaction under its own statement timeout."""
    return postgres.run_check_queries(
        settings.postgres,
        settings.migrations.smoke_queries,
        timeout_seconds=settings.migrations.smoke_timeout_seconds,
        application_name="swagger2mcp-ops-smoke",
    )


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
