"""Undoing a restore: the database it kept goes back in place, with proof."""

from __future__ import annotations

import contextlib
import time

from psycopg import sql

from tasks import postgres
from tasks.backup.database import _maintenance, database_lock_name
from tasks.backup.errors import RestoreFailed
from tasks.backup.restore.preflight import swap_back_preflight
from tasks.backup.restore.replace import RestoreResult
from tasks.backup.restore.swap import _swap, kept_open_command
from tasks.backup.stats import _database_stats, compare_stats
from tasks.runlog import run_logger
from tasks.settings import OpsSettings


def swap_back(
    settings: OpsSettings,
    kept_database: str,
    *,
    target_database: str,
    database_lock_held: bool = False,
) -> RestoreResult:
    """Undo a restore: put the database it kept back in place of ``target_database``, with proof.

    The kept database's tables are counted and hashed; its read-only default is lifted; then, under the
    target's lock, the target's sessions are ended and the two are swapped by rename in one transaction
    (the current target is kept as ``<target>__old_<time>``, read-only by default: nothing is dropped);
    finally the target is counted and hashed again and compared with what the kept database held.
    Stop the application's writers first (recover-data's scale to 0, maintenance mode): a write that
    lands between the swap and that count shows up as a difference (both databases are kept then).

    Returns:
        The change record; ``comparison`` proves the target now holds what was kept, ``old_database``
        names the database it replaced.

    Raises:
        ParameterError / DatabaseNotFound: nothing was touched.
        RestoreFailed: the target after the swap differs from what was kept (both databases stay).
        LockBusy: another run works on the same database.
    """
    started = time.monotonic()
    plan = swap_back_preflight(settings, kept_database, target_database=target_database)
    logger = run_logger(__name__)
    before = _database_stats(settings, kept_database)
    with contextlib.ExitStack() as held:
        lock_conn = held.enter_context(_maintenance(settings))
        if not database_lock_held:
            held.enter_context(
                postgres.advisory_lock(
                    lock_conn, database_lock_name(target_database), settings.backup.lock_timeout_seconds
                )
            )
        lock_conn.execute(
            sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(
                sql.Identifier(kept_database)
            )
        )
        terminated = _swap(settings, target_database, kept_database, plan.replaced_database)
    after = _database_stats(settings, target_database)
    comparison = compare_stats(
        before, after, database=target_database, backup_id=f"kept database {kept_database}"
    )
    if not comparison.matches:
        raise RestoreFailed(
            f"{target_database} after the swap differs from what {kept_database} held:"
            f" {comparison.summary()}; the database it replaced is kept as {plan.replaced_database}"
        )
    logger.info("swapped %s back in as %s; %s kept", kept_database, target_database, plan.replaced_database)
    return RestoreResult(
        backup_id=kept_database,
        target_database=target_database,
        scratch_database=kept_database,
        old_database=plan.replaced_database,
        old_kept=True,
        terminated_connections=terminated,
        comparison=comparison,
        commands=[
            f"ALTER DATABASE {kept_database} RESET default_transaction_read_only",
            f"ALTER DATABASE {target_database} RENAME TO {plan.replaced_database};"
            f" ALTER DATABASE {kept_database} RENAME TO {target_database}",
            f"ALTER DATABASE {plan.replaced_database} SET default_transaction_read_only = on",
        ],
        duration_seconds=round(time.monotonic() - started, 3),
        kept_open_command=kept_open_command(settings, plan.replaced_database),
    )
