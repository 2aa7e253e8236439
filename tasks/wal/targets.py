"""Where a restore to a point may go: the restorable window, and each kind of target checked against
it before anything is unpacked, started or touched.

The window runs from the oldest base backup's end (its consistent point) to the newest archived WAL.
A target is refused, with the window in the message, when it is

- a time: without a zone, in the future, before the window or after the newest archived WAL;
- an LSN: before the oldest base backup's stop LSN or past the newest archived segment;
- a transaction id: with no commit or abort record in the archived WAL after a base backup's end.

A transaction is found with ``pg_waldump --xid`` over the archived segments (fetched and checked as
recovery would), newest base backup first, so usually only the WAL since the newest one is read. Its
commit (or abort) record gives the LSN the plan needs and the time the report shows.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks.commands import run_command
from tasks.errors import ParameterError
from tasks.settings import OpsSettings
from tasks.storage import Storage
from tasks.wal import archive
from tasks.wal.base import BaseBackupManifest
from tasks.wal.names import PARTIAL_SUFFIX, parse_lsn, parse_segment
from tasks.wal.timelines import TimelinePath, archive_paths, latest_path

# Segments handed to one pg_waldump run; the last one is carried into the next run so that a record
# crossing the boundary is read whole.
_BATCH = 32
_WALDUMP_RE = re.compile(
    r"tx:\s*(?P<xid>\d+), lsn: (?P<lsn>[0-9A-F]+/[0-9A-F]+),.*desc: (?P<kind>COMMIT|ABORT)"
    r" (?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC"
)


class TargetOutsideWindow(ParameterError):
    """The target is not inside what the archive can restore; nothing was touched."""


@dataclass(frozen=True)
class RestorableWindow:
    """From the oldest base backup's end to the newest archived WAL."""

    start_time: datetime | None
    start_lsn: str | None
    start_backup: str | None
    end_time: datetime | None
    end_wal: str | None
    # The timelines the window's WAL runs along ("timeline 1 until 0/5000120, then timeline 2").
    timelines: str = ""

    def describe(self) -> str:
        if self.start_time is None:
            return "nothing is restorable yet: there is no base backup (run backup-base)"
        if self.end_time is None:
            return "nothing is restorable yet: the WAL archive is empty (start the archiver)"
        return (
            f"the restorable window is {self.start_time.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z (LSN"
            f" {self.start_lsn}, end of base backup {self.start_backup}) .. "
            f"{self.end_time.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z (newest archived WAL {self.end_wal})"
            + (f", along {self.timelines}" if ", then " in self.timelines else "")
        )


def restorable_window(
    bases: list[BaseBackupManifest],
    listing: archive.ArchiveListing,
    path: TimelinePath | None = None,
) -> RestorableWindow:
    """The window the archive serves now (``bases`` in any order).

    With ``path`` (the newest timeline's, :func:`tasks.wal.timelines.newest_path`) the window ends at
    the newest WAL a replay along it reads: WAL an old timeline wrote after its switch is not in it.
    """
    oldest = min(bases, key=lambda b: b.finished_at, default=None)
    newest = listing.newest()
    if path is not None and oldest is not None:
        size = oldest.wal_segment_size
        on_path = [
            (name, info.modified)
            for group in (listing.segments, listing.partials)
            for name, info in group.items()
            if path.on_path(name, size)
        ]
        newest = max(on_path, key=lambda item: (item[1], item[0]), default=newest)
    return RestorableWindow(
        start_time=oldest.finished_at if oldest else None,
        start_lsn=oldest.stop_lsn if oldest else None,
        start_backup=oldest.id if oldest else None,
        end_time=newest[1] if newest else None,
        end_wal=newest[0] if newest else None,
        timelines=path.describe() if path is not None else "",
    )


def _refuse(what: str, window: RestorableWindow) -> TargetOutsideWindow:
    return TargetOutsideWindow(f"{what}; {window.describe()}. Nothing was touched")


def check_time(target: datetime, window: RestorableWindow, *, now: datetime | None = None) -> None:
    """Refuse a time without a zone, in the future, or outside the window.

    Raises:
        ParameterError: no time zone.
        TargetOutsideWindow: outside the window (the message gives it).
    """
    if target.tzinfo is None:
        raise ParameterError(
            "target_time needs a time zone (e.g. 2026-03-01T14:05:00+00:00); nothing was touched"
        )
    now = now or datetime.now(UTC)
    shown = f"{target.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%f}Z"
    if target > now:
        raise _refuse(f"target_time {shown} is in the future (now {now:%Y-%m-%dT%H:%M:%S}Z)", window)
    if window.start_time is None or window.end_time is None:
        raise _refuse(f"target_time {shown} cannot be restored", window)
    if target <= window.start_time:
        raise _refuse(f"target_time {shown} is before the oldest base backup finished", window)
    if target > window.end_time:
        raise _refuse(
            f"target_time {shown} is after the newest archived WAL: pick an earlier time, or check the"
            " archiver (check-wal-archive)",
            window,
        )


def check_lsn(lsn: int, window: RestorableWindow, listing: archive.ArchiveListing, segment_size: int) -> None:
    """Refuse an LSN before the oldest base backup's end or past the newest archived segment.

    Raises:
        TargetOutsideWindow: outside the window (the message gives it).
    """
    shown = f"target_lsn {lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
    if window.start_lsn is None or window.end_wal is None:
        raise _refuse(f"{shown} cannot be restored", window)
    if lsn < parse_lsn(window.start_lsn):
        raise _refuse(f"{shown} is before the oldest base backup's end", window)
    # Segment numbers count WAL positions on every timeline alike.
    newest = max(parse_segment(n, segment_size).number for n in [*listing.segments, *listing.partials])
    if lsn // segment_size > newest:
        raise _refuse(f"{shown} is past the newest archived WAL", window)


def parse_xid(value: str | int) -> int:
    """A transaction id as a 32-bit xid (a 64-bit ``xid8`` from ``pg_current_xact_id()`` is accepted).

    Raises:
        ParameterError: not a number, or a special id (0-2).
    """
    text = str(value).strip()
    if not text.isdigit():
        raise ParameterError(
            f"target_xid must be a transaction id (a number), not {value!r}; nothing was touched"
        )
    xid = int(text) & 0xFFFFFFFF
    if xid < 3:
        raise ParameterError(f"target_xid {value} is not a normal transaction id; nothing was touched")
    return xid


@dataclass(frozen=True)
class XidRecord:
    """Where and when transaction ``xid`` ended, as its WAL record says."""

    xid: int
    lsn: str
    kind: str
    at: datetime

    def describe(self) -> str:
        return f"its {self.kind} at {self.at:%Y-%m-%dT%H:%M:%S.%f}Z, LSN {self.lsn}"


def _waldump(settings: OpsSettings, directory: Path, first: str, last: str, xid: int) -> XidRecord | None:
    argv = [
        str(settings.wal.server_bin_dir / "pg_waldump"),
        f"--path={directory}",
        f"--xid={xid}",
        "--rmgr=Transaction",
        first,
        last,
    ]
    # pg_waldump ends with an error where the fetched WAL ends (a partial segment, the batch's end):
    # what it printed up to there is what counts.
    result = run_command(argv, timeout=600, env={"TZ": "UTC"}, check=False, log_output=False)
    for line in result.stdout.splitlines():
        match = _WALDUMP_RE.search(line)
        if match and int(match["xid"]) == xid:
            at = datetime.fromisoformat(match["at"]).replace(tzinfo=UTC)
            return XidRecord(xid, match["lsn"], match["kind"], at)
    return None


def _scan(
    settings: OpsSettings, storage: Storage, names: list[str], partials: set[str], xid: int
) -> XidRecord | None:
    """Fetch ``names`` in batches into a scratch directory and look for ``xid``'s end record."""
    parent = settings.wal.scratch_dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ops-waldump-", dir=parent))
    try:
        # pg_waldump reads one timeline per run: a batch ends where the timeline changes.
        batches: list[list[str]] = []
        for name in names:
            if batches and len(batches[-1]) < _BATCH and batches[-1][-1][:8] == name[:8]:
                batches[-1].append(name)
            else:
                batches.append([name])
        carried: str | None = None
        for batch in batches:
            for name in batch:
                stored = name + PARTIAL_SUFFIX if name in partials else name
                (work / name).write_bytes(archive.fetch(storage, stored))
            if carried is not None and carried[:8] != batch[0][:8]:
                # The old timeline's last segment, named for the new one: a record that crosses into
                # the switch segment is read whole (its pages keep their own timeline ids).
                renamed = batch[0][:8] + carried[8:]
                (work / carried).rename(work / renamed)
                carried = renamed
            found = _waldump(settings, work, carried or batch[0], batch[-1], xid)
            if found is not None:
                return found
            for name in ([carried] if carried else []) + batch[:-1]:
                (work / name).unlink(missing_ok=True)
            carried = batch[-1]
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def locate_xid(
    settings: OpsSettings,
    storage: Storage,
    xid: int,
    bases: list[BaseBackupManifest],
    listing: archive.ArchiveListing,
    window: RestorableWindow,
) -> tuple[XidRecord, BaseBackupManifest]:
    """Find transaction ``xid``'s commit or abort record in the archive and the newest base backup that
    ends before it.

    Raises:
        TargetOutsideWindow: no such record after a base backup's end (the message gives the window).
        WalArchiveError: a segment in the scanned range is corrupt.
    """
    if not bases or window.end_wal is None:
        raise _refuse(f"transaction {xid} cannot be restored to", window)
    newest_first = sorted(bases, key=lambda b: parse_lsn(b.start_lsn), reverse=True)
    size = newest_first[0].wal_segment_size
    newest = parse_segment(window.end_wal, size)
    archived = set(listing.segments) | set(listing.partials)
    paths, _ = archive_paths(storage, listing)
    end = newest
    for position, base in enumerate(newest_first):
        first = parse_segment(base.start_wal, size)
        if position > 0 and first.number > end.number:
            continue
        path = latest_path(paths, base.timeline, parse_lsn(base.start_lsn))
        names = [s.name for s in path.segments(first.number, end.number, size) if s.name in archived]
        found = _scan(settings, storage, names, set(listing.partials) - set(listing.segments), xid)
        if found is not None:
            usable = [b for b in newest_first if parse_lsn(b.stop_lsn) <= parse_lsn(found.lsn)]
            if not usable:
                raise _refuse(
                    f"transaction {xid} ended ({found.describe()}) before the oldest base backup was"
                    " consistent",
                    window,
                )
            return found, usable[0]
        end = first  # older ranges end where this one starts (one segment read twice, at the seam)
    raise _refuse(
        f"transaction {xid} has no commit or abort record in the archived WAL: it is older than the"
        " oldest base backup, still running, or has not happened yet",
        window,
    )
