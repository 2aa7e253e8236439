"""One migration at a time per database: PostgreSQL advisory locks on the maintenance database."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tasks import backup, locks, postgres
from tasks.migrate.config import target_database
from tasks.runlog import run_logger
from tasks.settings import OpsSettings


def lock_name(settings: OpsSettings) -> str:
    """The advisory lock name guarding migrations of the target database."""
    return settings.migrations.lock_key or f"swagger2mcp-ops:migrate:{target_database(settings)}"


@contextlib.contextmanager
def migration_lock(settings: OpsSettings, *, owner: str) -> Iterator[str]:
    """Hold the migration lock of the target database, and its restore lock, for the block.

    The locks live on the maintenance database: a restore replaces the target database (its
    sessions are terminated), and the locks must survive that. Holding the restore lock too
    (:func:`tasks.backup.database_lock_name`) keeps a manual restore from replacing the database in
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
    database_lock = backup.database_lock_name(target_database(settings))
    with (
        conn,
        postgres.advisory_lock(conn, name, timeout, holder=holder.describe()),
        postgres.advisory_lock(conn, database_lock, timeout, holder=holder.describe()),
    ):
        run_logger(__name__).info("holding locks %s and the database's restore lock", name)
        yield name
