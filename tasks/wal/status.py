"""The archive's state for health, diagnose and the archiver's ``--status``: the newest WAL received
and its age (the RPO), the replication slot and the WAL it holds back on the server, gaps, and the
window a restore to a point can reach (from the oldest base backup's end to the newest WAL)."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from pydantic import BaseModel

from tasks.settings import OpsSettings
from tasks.storage import Storage, open_storage
from tasks.wal import archive
from tasks.wal.server import WalServerError, connect


class SlotState(BaseModel):
    """The archiver's replication slot as the server sees it."""

    name: str
    exists: bool
    active: bool = False
    restart_lsn: str | None = None
    lag_bytes: int | None = None


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
    base_backups: int = 0
    problems: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


def slot_state(settings: OpsSettings) -> SlotState:
    """The slot's row in ``pg_replication_slots`` and how far it is behind the server's WAL.

    Raises:
        WalServerError: the server cannot be reached.
    """
    name = settings.wal.slot
    with connect(settings, purpose="wal-status") as conn:
        row = conn.execute(
            "SELECT active, restart_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
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
        if status.rpo_seconds > cfg.rpo_warn_seconds:
            problems.append(
                f"the newest archived WAL ({newest[0]}) is {status.rpo_seconds:.0f}s old (over"
                f" {cfg.rpo_warn_seconds:.0f}s): is the archiver running? see its log and the slot below"
            )
    else:
        problems.append("the WAL archive is empty: start the archiver (python -m tasks.wal.archiver)")
    size = archive.segment_size(storage, listing)
    if size is not None:
        status.gaps = archive.gaps(listing, size)
        if status.gaps:
            problems.append(
                f"{len(status.gaps)} WAL segments are missing inside the archive"
                f" ({', '.join(status.gaps[:5])}): no restore can replay across them; take a new base backup"
            )
    try:
        status.slot = slot_state(settings)
    except (WalServerError, psycopg.Error) as exc:
        status.slot_error = str(exc)
        problems.append(f"the replication slot could not be read: {exc}")
    if status.slot is not None:
        if not status.slot.exists:
            problems.append(f"replication slot {cfg.slot} does not exist: start the archiver, it creates it")
        elif (status.slot.lag_bytes or 0) > cfg.slot_lag_warn_bytes:
            problems.append(
                f"slot {cfg.slot} holds {status.slot.lag_bytes} bytes of WAL on the server (over"
                f" {cfg.slot_lag_warn_bytes}): the archiver is behind or down and the server's disk fills"
            )
    bases = list_base_backups(settings, storage=storage)
    status.base_backups = len(bases)
    if bases and status.last_wal_at is not None:
        status.window_start = min(b.finished_at for b in bases)
        status.window_end = status.last_wal_at
    elif not bases:
        problems.append("no base backup yet: run backup-base; until then no restore to a point is possible")
    status.problems = problems
    return status
