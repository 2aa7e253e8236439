"""The Prefect tasks of this package, all wrapped here: the plain functions stay callable without
Prefect (tests, other tasks), and the migrate-database and maintenance-window flows call the wrapped
ones. The task names are the ones the UI and the flows' runs show."""

from __future__ import annotations

from tasks.migrate.apply import apply_migrations
from tasks.migrate.maintenance import set_maintenance_mode
from tasks.migrate.plan import migration_status, plan_migrations
from tasks.migrate.runs import check_no_interrupted_run, finish_run, resolve_run, unfinished_runs
from tasks.migrate.verify import run_smoke_queries, verify_migrations
from tasks.ops_task import ops_task

migration_status_task = ops_task(migration_status, name="migration-status")
check_no_interrupted_run_task = ops_task(check_no_interrupted_run, name="check-interrupted-migration")
unfinished_runs_task = ops_task(unfinished_runs, name="find-unfinished-migrations")
plan_migrations_task = ops_task(plan_migrations, name="plan-migrations")
apply_migrations_task = ops_task(apply_migrations, name="apply-migrations")
verify_migrations_task = ops_task(verify_migrations, name="verify-migrations", retries=1)
run_smoke_queries_task = ops_task(run_smoke_queries, name="smoke-queries")
finish_run_task = ops_task(finish_run, name="finish-migration-run", retries=2)
resolve_run_task = ops_task(resolve_run, name="resolve-migration-run")
set_maintenance_mode_task = ops_task(
    set_maintenance_mode, name="set-maintenance-mode", retries=2, retry_delay_seconds=5
)
