"""Restore a database to a moment: replay the archive into a scratch PostgreSQL, then take the
logical backups' proven path onto the app's server.

1. plan (reads only): pick the newest base backup finished before the target, list every WAL
   segment from its start to the target (across timeline switches, along the newest timeline:
   :mod:`tasks.wal.timelines`), and check each is archived and matches its checksums: a
   missing or corrupt segment is named here, before anything is unpacked or started;
2. unpack the base backup into a scratch data directory (sha256 checked) while the planned WAL is
   fetched and checked into it on a thread, write ``recovery.signal`` and a configuration of our own
   (a ``restore_command`` taking the staged files, the target, ``recovery_target_action = promote``,
   a private port and socket directory), start ``postgres`` (same major) as ``wal.server_os_user``
   and wait until it has promoted (:mod:`tasks.wal.scratch`);
3. copy the database logically into a new database on the app's server (:mod:`tasks.wal.copy`, the
   rows by :mod:`tasks.wal.rows`), compare every table's row count and content hash with the scratch
   instance, then swap the two by rename under the database's advisory lock (``tasks.backup``); the
   replaced database is kept.

The scratch instance and directory are removed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from tasks import backup, postgres
from tasks.backup import TableComparison, compare_stats
from tasks.backup.database import _maintenance, _scratch_database
from tasks.backup.restore.swap import _database_owner, _swap
from tasks.errors import CommandError, ParameterError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import Storage, open_storage
from tasks.wal import archive, targets, timelines
from tasks.wal import tables as side_tables
from tasks.wal.base import BaseBackupManifest, list_base_backups
from tasks.wal.copy import _copy_and_read
from tasks.wal.names import WalNameError, format_lsn, parse_lsn, parse_segment
from tasks.wal.scratch import (
    Phases,
    PointRestoreError,
    ScratchServer,
    scratch_server,
)

__all__ = ["Phases", "PointRestoreError", "ScratchServer", "scratch_server"]


@dataclass(frozen=True)
class PointPlan:
    """What a restore to a point will use, checked before anything is touched."""

    target: str
    target_time: datetime | None
    target_lsn: str | None
    database: str
    base: BaseBackupManifest
    segments: list[str]
    check: archive.ArchiveCheck
    target_xid: str | None = None
    window: str = ""
    # (schema, table) pairs: only these come back, into a side schema of the live database.
    tables: tuple[tuple[str, str], ...] = ()
    # False: stop just before the first WAL record at the target LSN (a dump's snapshot position).
    inclusive: bool = True
    # The timelines the replay follows ("timeline 1 until 0/5000120, then timeline 2").
    timelines: str = ""

    def steps(self) -> list[str]:
        replay = [
            f"unpack base backup {self.base.id} (finished {self.base.finished_at:%Y-%m-%d %H:%M:%S} UTC,"
            f" WAL from {self.base.start_lsn}) into a scratch data directory",
            f"replay {len(self.segments)} archived WAL segments ({self.segments[0]}..{self.segments[-1]})"
            f" to {self.target} in a scratch PostgreSQL"
            + (f", along {self.timelines}" if ", then " in self.timelines else ""),
        ]
        if self.tables:
            names = ", ".join(f"{s}.{t}" for s, t in self.tables)
            return [
                *replay,
                f"check that {names} existed in {self.database} at the target, and move them into a new"
                " schema restored_<time> of the scratch instance (foreign keys to other tables and triggers"
                " dropped there)",
                f"copy that schema into {self.database} on the app's server in one transaction and compare"
                " each table with the recovered one",
                f"every other table of {self.database} keeps today's data; nothing is swapped",
            ]
        return [
            *replay,
            f"copy database {self.database} into a new database on the app's server and compare every table",
            f"swap it in for {self.database} by rename; the current {self.database} is kept renamed",
        ]


@dataclass(frozen=True)
class PointRestoreResult:
    """What the restore to a point did, with the comparison proving the copy equals the replay."""

    plan: PointPlan
    reached: str
    target_database: str
    old_database: str | None
    comparison: TableComparison
    commands: list[str] = field(default_factory=list)
    duration_seconds: float = 0.0
    # A per-table restore: the side schema and what it holds (old_database is None then).
    side: side_tables.TablesRestored | None = None
    phases: Phases = field(default_factory=Phases)


def _storage(settings: OpsSettings) -> Storage:
    return open_storage(settings.storage, attempts=settings.backup.upload_attempts)


def plan_point_restore(
    settings: OpsSettings,
    *,
    target_time: datetime | None = None,
    target_lsn: str | None = None,
    target_xid: str | int | None = None,
    database: str | None = None,
    tables: list[str] | None = None,
    storage: Storage | None = None,
    now: datetime | None = None,
) -> PointPlan:
    """Choose the base backup and check every WAL segment up to the target; touches nothing.

    Exactly one target: ``target_time`` (with a zone), ``target_lsn``, or ``target_xid`` (recovery stops
    just before that transaction's commit). Each is checked against the restorable window first
    (:mod:`tasks.wal.targets`). ``tables`` (``table`` or ``schema.table``) makes it a per-table restore
    into a side schema (:mod:`tasks.wal.tables`).

    Raises:
        ParameterError: not exactly one target, a naive time, or a malformed LSN or xid.
        TargetOutsideWindow: the target is in the future or outside the restorable window (the message
            gives the window).
        PointRestoreError: no base backup before the target.
        WalArchiveError: segments are missing or corrupt (named in the message).
    """
    if sum(t is not None for t in (target_time, target_lsn, target_xid)) != 1:
        raise ParameterError(
            "give exactly one of target_time, target_lsn and target_xid; nothing was touched"
        )
    if target_time is not None and target_time.tzinfo is None:
        raise ParameterError(
            "target_time needs a time zone (e.g. 2026-03-01T14:05:00+00:00); nothing was touched"
        )
    try:
        lsn = parse_lsn(target_lsn) if target_lsn is not None else None
    except WalNameError as exc:
        raise ParameterError(f"{exc}; nothing was touched") from None
    xid = targets.parse_xid(target_xid) if target_xid is not None else None
    wanted = side_tables.parse_tables(tables) if tables is not None else ()
    storage = storage or _storage(settings)
    database = database or postgres.database_name(settings.postgres.dsn.get_secret_value())
    bases = list_base_backups(settings, storage=storage)
    listing = archive.list_archive(storage)
    paths, path_problems = timelines.archive_paths(storage, listing)
    window = targets.restorable_window(bases, listing, timelines.newest_path(paths))
    ended: targets.XidRecord | None = None
    if target_time is not None:
        targets.check_time(target_time, window, now=now)
        usable = [b for b in bases if b.finished_at < target_time]
        target = f"time {target_time.astimezone(UTC).isoformat()}"
    elif xid is not None:
        ended, chosen = targets.locate_xid(settings, storage, xid, bases, listing, window)
        lsn = parse_lsn(ended.lsn)
        usable = [chosen]
        target = f"just before transaction {xid} ({ended.describe()})"
    else:
        assert lsn is not None
        if bases:
            targets.check_lsn(lsn, window, listing, bases[0].wal_segment_size)
        usable = [b for b in bases if parse_lsn(b.stop_lsn) <= lsn]
        target = f"LSN {format_lsn(lsn)}"
    if not usable:
        raise PointRestoreError(
            f"no base backup finished before {target}; {window.describe()}. Nothing was touched"
        )
    base = usable[0]
    size = base.wal_segment_size
    first = parse_segment(base.start_wal, size)
    # The replay follows the newest timeline through the base backup's start (recovery_target_timeline
    # = 'latest'): segments before a switch come from the old timeline, from its segment on the new.
    path = timelines.latest_path(paths, base.timeline, parse_lsn(base.start_lsn))
    if lsn is not None:
        last_number = lsn // size
    else:
        assert target_time is not None
        # The first segment shipped after the target holds it (or the first commit after it).
        on_path = [
            n
            for n in timelines.path_names(path, listing, size, partials=False)
            if parse_segment(n, size).number >= first.number
        ]
        later = [n for n in on_path if listing.segments[n].modified >= target_time]
        partial = [
            n
            for n in timelines.path_names(path, listing, size)
            if n in listing.partials and listing.partials[n].modified >= target_time
        ]
        if later:
            last_number = parse_segment(later[0], size).number
        elif partial:
            last_number = parse_segment(partial[-1], size).number
        else:
            raise PointRestoreError(
                f"{target} is past the newest archived WAL; {window.describe()}. Pick an earlier time or"
                " check the archiver. Nothing was touched"
            )
    last_number = max(last_number, parse_lsn(base.stop_lsn) // size)
    names = [s.name for s in path.segments(first.number, last_number, size)]
    check = archive.check_segments(storage, names)
    if not check.ok:
        raise archive.WalArchiveError(
            f"restore to {target} from base backup {base.id} is not possible: {check.summary()}."
            " Nothing was touched; pick a target before the first missing segment, or a later base backup"
            + "".join(f". {problem}" for problem in path_problems)
        )
    return PointPlan(
        target,
        target_time,
        target_lsn,
        database,
        base,
        names,
        check,
        target_xid=None if xid is None else str(xid),
        window=window.describe(),
        tables=wanted,
        timelines=path.describe(),
    )


# --- the scratch instance -------------------------------------------------------------------------


def restore_to_point(
    settings: OpsSettings,
    *,
    target_time: datetime | None = None,
    target_lsn: str | None = None,
    target_xid: str | int | None = None,
    database: str | None = None,
    tables: list[str] | None = None,
    plan: PointPlan | None = None,
    database_lock_held: bool = False,
) -> PointRestoreResult:
    """Bring ``database`` back as it was at the target (see the module's steps); the old one is kept.

    With ``tables`` (or a plan that names them) only those tables come back, into a side schema of the
    live database (:func:`tasks.wal.tables.copy_tables`); nothing is swapped.

    Args:
        database_lock_held: the caller holds the database's lock (:func:`tasks.backup.database_lock_name`)
            on its own session, as recover-data does for its whole run; else it is taken for the swap.

    Raises:
        ParameterError / PointRestoreError / WalArchiveError: from the plan, before anything is touched.
        BackupCorrupt: the base backup fails its checksum (nothing touched).
        PointRestoreError: recovery stopped early, or the copy differs from the replay (app untouched).
        TablesNotFound: a named table did not exist at the target (the live database untouched).
        LockBusy: another run works on the database.
    """
    started = time.monotonic()
    logger = run_logger(__name__)
    storage = _storage(settings)
    phases = Phases()
    if plan is None:
        with phases.timed("plan and check the archive"):
            plan = plan_point_restore(
                settings,
                target_time=target_time,
                target_lsn=target_lsn,
                target_xid=target_xid,
                database=database,
                tables=tables,
                storage=storage,
            )
    target = plan.database
    commands: list[str] = []
    with scratch_server(settings, storage, plan, phases=phases) as server:
        with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,)).fetchone() is None:
                raise PointRestoreError(
                    f"database {target!r} did not exist at {plan.target}; nothing was touched"
                )
        if plan.tables:
            with phases.timed("copy and compare tables"):
                side = side_tables.copy_tables(
                    settings,
                    server.conninfo(target),
                    target,
                    plan.tables,
                    label=f"{plan.base.id} at {plan.target}",
                    database_lock_held=database_lock_held,
                )
            return PointRestoreResult(
                plan=plan,
                reached=server.reached(),
                target_database=target,
                old_database=None,
                comparison=side.comparison,
                commands=side.commands,
                duration_seconds=round(time.monotonic() - started, 3),
                side=side,
                phases=phases,
            )
        copy_name = backup.scratch_name(target, "pitr")
        with _maintenance(settings) as lock_conn:
            owner = _database_owner(lock_conn, target)
        with _scratch_database(settings, copy_name, owner=owner) as copy:
            try:
                # Not in the scratch directory: that goes once the recovered tables are read, while
                # the copy's indexes are still built from the schema file.
                with tempfile.TemporaryDirectory(
                    prefix="ops-pitr-schema-", dir=settings.wal.scratch_dir
                ) as work:
                    copied = _copy_and_read(
                        settings,
                        server,
                        target,
                        copy,
                        workdir=Path(work),
                        phases=phases,
                        release_source=server.release,
                    )
            except CommandError as exc:
                raise PointRestoreError(
                    f"copying the recovered {target} failed; {target} was not touched: {exc}"
                ) from None
            commands += copied.commands
            comparison = compare_stats(
                copied.expected, copied.actual, database=copy, backup_id=f"{plan.base.id} at {plan.target}"
            )
            if not comparison.matches:
                raise PointRestoreError(
                    f"the copy differs from the recovered instance; {target} was not touched:"
                    f" {comparison.summary()}"
                )
            reached = server.reached()
            with contextlib.ExitStack() as held:
                if not database_lock_held:
                    lock_conn = held.enter_context(_maintenance(settings))
                    held.enter_context(
                        postgres.advisory_lock(
                            lock_conn, backup.database_lock_name(target), settings.backup.lock_timeout_seconds
                        )
                    )
                old = None
                if backup.database_exists(settings, target):
                    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
                    old = target[: 63 - len(stamp) - 6] + f"__old_{stamp}"
                with phases.timed("swap"):
                    _swap(settings, target, copy, old)
            commands.append(
                f"ALTER DATABASE {target} RENAME TO {old}; ALTER DATABASE {copy} RENAME TO {target}"
                if old
                else f"ALTER DATABASE {copy} RENAME TO {target}"
            )
    logger.info("restored %s to %s (%s); old database kept as %s", target, plan.target, reached, old)
    return PointRestoreResult(
        plan=plan,
        reached=reached,
        target_database=target,
        old_database=old,
        comparison=comparison,
        commands=commands,
        duration_seconds=round(time.monotonic() - started, 3),
        phases=phases,
    )


__all__ = ["PointPlan", "PointRestoreError", "PointRestoreResult", "plan_point_restore", "restore_to_point"]
