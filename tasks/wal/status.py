"""The archive's state for health, diagnose and the archiver's ``--status``: the newest WAL received
and its age (the RPO), the replication slot and the WAL it holds back on the server, gaps, the
timelines, and the window a restore to a point can reach (from the oldest base backup's end to the
newest WAL). Also when the ``wal.rpo-exceeded`` event is due (:func:`rpo_alert_due`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from pydantic import BaseModel

from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, Storage, WriteConflict, open_storage
from tasks.wal import archive, timelines
from tasks.wal.server import WalServerError, connect

RPO_EXCEEDED_EVENT = "swagger2mcp-ops.wal.rpo-exceeded"
# While the RPO stays past its threshold, the event is emitted again this often (a daily reminder).
RPO_REMIND = timedelta(hours=24)
# In every problem that means a hole in the archive (diagnose makes those critical).
UNREPLAYABLE = "no restore can replay across"


class SlotState(BaseModel):
    """The archiver's replication slot as the server sees it."""

    name: str
    exists: bool
    active: bool = False
    restart_lsn: str | None = None
    lag_bytes: int | None = None
    # pg_replication_slots.wal_status (PostgreSQL 13+): reserved / extended (kept), unreserved (past
    # max_slot_wal_keep_size: the next checkpoint removes it), lost (removed: the slot is invalidated).
    wal_status: str | None = None
    # Bytes the server may still write before the slot's WAL is no longer kept (None: no limit set or
    # lost; negative: already past it).
    safe_wal_size: int | None = None

    @property
    def lost(self) -> bool:
        """The server removed WAL the slot needed (invalidated by ``max_slot_wal_keep_size``)."""
        return self.exists and self.wal_status == "lost"


class ArchiveStatus(BaseModel):
    """The WAL archive at one moment."""

    checked_at: datetime
    storage: str
    segments: int
    last_wal: str | None = None
    last_wal_at: datetime | None = None
    rpo_seconds: float | None = None
    gaps: list[str] = []
    slot: SlotState | None = None
    slot_error: str | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    window_start_backup: str | None = None
    window_end_wal: str | None = None
    timelines: list[int] = []
    # The newest timeline's WAL as a replay reads it ("timeline 1 until 0/5000120, then timeline 2").
    timeline_path: str | None = None
    base_backups: int = 0
    problems: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def in_use(self) -> bool:
        """Whether the storage holds any of a point-in-time archive (WAL or a base backup)."""
        return bool(self.segments or self.last_wal or self.base_backups)

    @property
    def caught_up(self) -> bool:
        """The archiver streams and has received every byte of WAL the server wrote (an idle server:
        the newest archived WAL may be old, yet nothing is at risk)."""
        slot = self.slot
        return slot is not None and slot.exists and slot.active and slot.lag_bytes == 0

    def rpo_exceeded(self, threshold_seconds: float) -> bool:
        """No WAL archived at all, or the newest older than ``threshold_seconds`` while the server has
        WAL the archiver has not received (or the archiver does not stream)."""
        if self.rpo_seconds is None:
            return True
        return self.rpo_seconds > threshold_seconds and not self.caught_up

    def rpo_facts(self) -> dict[str, Any]:
        """What the ``rpo-exceeded`` event carries (as health reports them)."""
        return {
            "rpo_seconds": self.rpo_seconds,
            "last_wal": self.last_wal,
            "last_wal_at": None if self.last_wal_at is None else self.last_wal_at.isoformat(),
            "slot_retained_bytes": None if self.slot is None else self.slot.lag_bytes,
            "caught_up": self.caught_up,
        }


def archive_in_use(storage: Storage) -> bool:
    """Whether point-in-time recovery is set up here: the storage holds a base backup or archived WAL."""
    from tasks.wal.base import BASE_DIR

    return bool(storage.list(f"{BASE_DIR}/manifests")) or bool(storage.list(archive.WAL_DIR))


def slot_state(settings: OpsSettings) -> SlotState:
    """The slot's row in ``pg_replication_slots`` and how far it is behind the server's WAL.

    Raises:
        WalServerError: the server cannot be reached.
    """
    with connect(settings, purpose="wal-status") as conn:
        return read_slot(conn, settings.wal.slot)


def read_slot(conn: psycopg.Connection, name: str) -> SlotState:
    """The slot ``name`` as ``conn``'s server sees it (see :func:`slot_state`)."""
    row = conn.execute(
        "SELECT active, restart_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " wal_status, safe_wal_size FROM pg_replication_slots WHERE slot_name = %s",
        (name,),
    ).fetchone()
    if row is None:
        return SlotState(name=name, exists=False)
    return SlotState(
        name=name,
        exists=True,
        active=bool(row[0]),
        restart_lsn=row[1],
        lag_bytes=int(row[2]) if row[2] is not None else None,
        wal_status=row[3],
        safe_wal_size=int(row[4]) if row[4] is not None else None,
    )


def slot_lost_problem(slot: str, last_wal: str | None) -> str:
    """What an invalidated slot means for the archive, and what to do about it."""
    after = f" after {last_wal}" if last_wal else ""
    return (
        f"replication slot {slot} is lost: the archiver was down or behind past max_slot_wal_keep_size and"
        f" the server removed WAL it had not received, so the archive has a gap{after} that {UNREPLAYABLE}."
        " Start (or restart) the archiver: it drops and re-creates the slot, records the"
        " gap and streams from the server's current position; then take a new base backup (backup-base),"
        " restores to a point before the gap only reach up to it"
    )


def archive_status(
    settings: OpsSettings, *, storage: Storage | None = None, now: datetime | None = None
) -> ArchiveStatus:
    """Read the archive (and ask the server about the slot); never raises for what it finds."""
    from tasks.wal.base import list_base_backups

    storage = storage or open_storage(settings.storage, attempts=settings.backup.upload_attempts)
    now = now or datetime.now(UTC)
    cfg = settings.wal
    listing = archive.list_archive(storage)
    newest = listing.newest()
    status = ArchiveStatus(checked_at=now, storage=storage.location, segments=len(listing.segments))
    problems: list[str] = []
    if newest is not None:
        status.last_wal, status.last_wal_at = newest
        status.rpo_seconds = round((now - newest[1]).total_seconds(), 1)
    else:
        problems.append("the WAL archive is empty: start the archiver (python -m tasks.wal.archiver)")
    size = archive.segment_size(storage, listing)
    paths, path_problems = timelines.archive_paths(storage, listing)
    problems += path_problems
    newest_path = timelines.newest_path(paths)
    if newest_path is not None:
        status.timeline_path = newest_path.describe()
    if size is not None:
        # Each timeline over its own range, and the newest timeline's path across its switches (a new
        # timeline archived from later than its switch leaves a hole no single timeline shows).
        found = set(archive.gaps(listing, size))
        if newest_path is not None:
            found.update(timelines.path_gaps(newest_path, listing, size))
        status.gaps = sorted(found, key=lambda name: (int(name[8:], 16), name[:8]))
        if status.gaps:
            problems.append(
                f"{len(status.gaps)} WAL segments are missing inside the archive"
                f" ({', '.join(status.gaps[:5])}): {UNREPLAYABLE} them; take a new base backup"
            )
    try:
        status.slot = slot_state(settings)
    except (WalServerError, psycopg.Error) as exc:
        status.slot_error = str(exc)
        problems.append(f"the replication slot could not be read: {exc}")
    if newest is not None and status.rpo_exceeded(cfg.rpo_warn_seconds):
        problems.insert(
            0,
            f"the newest archived WAL ({newest[0]}) is {status.rpo_seconds:.0f}s old (over"
            f" {cfg.rpo_warn_seconds:.0f}s) and the archiver is not streaming all of the server's WAL:"
            " is the archiver running? see its log and the slot below",
        )
    if status.slot is not None:
        if not status.slot.exists:
            problems.append(f"replication slot {cfg.slot} does not exist: start the archiver, it creates it")
        elif status.slot.lost:
            problems.append(slot_lost_problem(cfg.slot, status.last_wal))
        elif status.slot.wal_status == "unreserved":
            problems.append(
                f"slot {cfg.slot} is unreserved: it holds more WAL than max_slot_wal_keep_size allows"
                f" ({-(status.slot.safe_wal_size or 0)} bytes over), so the server's next checkpoint removes"
                " WAL the archiver has not received and the slot is lost: start the archiver (or see why it"
                " is behind) now"
            )
        elif (status.slot.lag_bytes or 0) > cfg.slot_lag_warn_bytes:
            problems.append(
                f"slot {cfg.slot} holds {status.slot.lag_bytes} bytes of WAL on the server (over"
                f" {cfg.slot_lag_warn_bytes}): the archiver is behind or down and the server's disk fills"
            )
    status.timelines = timelines.archive_timelines(listing)
    bases = list_base_backups(settings, storage=storage)
    status.base_backups = len(bases)
    if bases and status.last_wal_at is not None:
        oldest = min(bases, key=lambda b: (b.finished_at, b.id))
        status.window_start = oldest.finished_at
        status.window_start_backup = oldest.id
        status.window_end = status.last_wal_at
        status.window_end_wal = status.last_wal
    elif not bases:
        problems.append("no base backup yet: run backup-base; until then no restore to a point is possible")
    status.problems = problems
    return status


class RpoAlertState(BaseModel):
    """Whether the RPO is past its threshold, since when, and when the event was last emitted."""

    exceeded: bool = False
    since: datetime | None = None
    emitted_at: datetime | None = None


def rpo_alert_key(settings: OpsSettings) -> str:
    return f"{settings.notifications.state_prefix}/wal-rpo-{settings.stack}.json"


def rpo_alert_due(
    settings: OpsSettings,
    rpo_seconds: float | None,
    *,
    caught_up: bool = False,
    storage: Storage | None = None,
    now: datetime | None = None,
) -> bool:
    """Whether ``swagger2mcp-ops.wal.rpo-exceeded`` is to be emitted for an archive whose newest WAL
    is ``rpo_seconds`` old (None: no WAL archived) now; ``caught_up``: the archiver has received all
    the server's WAL (:attr:`ArchiveStatus.caught_up`), so an old newest WAL is only an idle server.

    Once when the RPO passes ``wal.rpo_warn_seconds``, again every :data:`RPO_REMIND` while it stays
    past, and not again until it has come back under. Health and check-wal-archive both ask; the state
    lives in the storage (``notifications.state_prefix``) and is written conditionally, so of two runs
    at the same moment only one emits.
    """
    storage = storage or open_storage(settings.storage, attempts=settings.backup.upload_attempts)
    now = now or datetime.now(UTC)
    key = rpo_alert_key(settings)
    try:
        stored = storage.get_versioned(key)
        state, version = RpoAlertState.model_validate_json(stored.data), stored.version
    except ObjectNotFound:
        state, version = RpoAlertState(), None
    except ValueError:  # unreadable: start over rather than stay silent
        state, version = RpoAlertState(), storage.get_versioned(key).version
    exceeded = rpo_seconds is None or (rpo_seconds > settings.wal.rpo_warn_seconds and not caught_up)
    reminder = state.emitted_at is not None and now - state.emitted_at >= RPO_REMIND
    due = exceeded and (not state.exceeded or state.emitted_at is None or reminder)
    if exceeded == state.exceeded and not due:
        return False
    new = RpoAlertState(
        exceeded=exceeded,
        since=(state.since if state.exceeded else now) if exceeded else None,
        emitted_at=now if due else state.emitted_at,
    )
    try:
        storage.put_if_version(key, new.model_dump_json().encode(), version)
    except (WriteConflict, ObjectNotFound):
        return False  # another run recorded it at the same moment, and emits
    return due
