"""Schema migrations: status, plan, apply and verify, for Alembic (in-process) or any migration CLI,
and the application's writers stopped for the window in which a run backs up, changes and may restore
the database.

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
- One migration at a time per database: a PostgreSQL advisory lock on the maintenance database (it
  survives the target being replaced by a restore), naming the holder when busy.

Where things are:

- ``model``: the errors and typed results (plan, change record, verification, marker row);
- ``config``: the configured tool and target database, checked before any side effect;
- ``alembic_env``: Alembic through the app's ``env.py`` (config, revisions, offline SQL);
- ``lock``: the migration lock;
- ``plan``: status and plan (``upgrade --sql`` per revision, or the tool's status);
- ``apply``: applying, with the durable run marker written first;
- ``verify``: the revision reached and the smoke queries;
- ``runs``: the run marker table (interrupted runs, resolving them);
- ``maintenance``: the application's maintenance mode;
- ``writers``: stopping the application's writers for a run's window;
- ``prefect_tasks``: the Prefect tasks the flows call.

Import the names below from this package; the modules are how the code is organised, not an API.
"""

from tasks.migrate.alembic_env import alembic_config
from tasks.migrate.apply import apply_migrations
from tasks.migrate.config import require_configured, target_argv, target_database
from tasks.migrate.lock import lock_name, migration_lock
from tasks.migrate.maintenance import MaintenanceChange, set_maintenance_mode
from tasks.migrate.model import (
    HEAD,
    AppliedStep,
    ApplyRecord,
    InterruptedMigration,
    MigrationError,
    MigrationPlan,
    MigrationRun,
    MigrationStatus,
    MigrationVerifyFailed,
    RevisionStep,
    SmokeResult,
    Verification,
)
from tasks.migrate.plan import migration_status, plan_migrations, require_target, status_is_read_only
from tasks.migrate.prefect_tasks import (
    apply_migrations_task,
    check_no_interrupted_run_task,
    finish_run_task,
    migration_status_task,
    plan_migrations_task,
    resolve_run_task,
    run_smoke_queries_task,
    set_maintenance_mode_task,
    unfinished_runs_task,
    verify_migrations_task,
)
from tasks.migrate.runs import (
    RUNS_TABLE,
    UNFINISHED,
    begin_run,
    check_no_interrupted_run,
    describe_interrupted,
    finish_run,
    mark_run,
    resolve_run,
    unfinished_runs,
    without_own_tables,
)
from tasks.migrate.verify import run_smoke_queries, verify_migrations
from tasks.migrate.writers import (
    WRITES_POLICIES,
    WritersNotStoppable,
    WritersStillRunning,
    WriterStopPlan,
    WriterStopRecord,
    WritesPolicy,
    plan_writer_stop,
    writer_services,
    writers_stopped,
)

__all__ = [
    "HEAD",
    "RUNS_TABLE",
    "UNFINISHED",
    "WRITES_POLICIES",
    "AppliedStep",
    "ApplyRecord",
    "InterruptedMigration",
    "MaintenanceChange",
    "MigrationError",
    "MigrationPlan",
    "MigrationRun",
    "MigrationStatus",
    "MigrationVerifyFailed",
    "RevisionStep",
    "SmokeResult",
    "Verification",
    "WriterStopPlan",
    "WriterStopRecord",
    "WritersNotStoppable",
    "WritersStillRunning",
    "WritesPolicy",
    "alembic_config",
    "apply_migrations",
    "apply_migrations_task",
    "begin_run",
    "check_no_interrupted_run",
    "check_no_interrupted_run_task",
    "describe_interrupted",
    "finish_run",
    "finish_run_task",
    "lock_name",
    "mark_run",
    "migration_lock",
    "migration_status",
    "migration_status_task",
    "plan_migrations",
    "plan_migrations_task",
    "plan_writer_stop",
    "require_configured",
    "require_target",
    "resolve_run",
    "resolve_run_task",
    "run_smoke_queries",
    "run_smoke_queries_task",
    "set_maintenance_mode",
    "set_maintenance_mode_task",
    "status_is_read_only",
    "target_argv",
    "target_database",
    "unfinished_runs",
    "unfinished_runs_task",
    "verify_migrations",
    "verify_migrations_task",
    "without_own_tables",
    "writer_services",
    "writers_stopped",
]
