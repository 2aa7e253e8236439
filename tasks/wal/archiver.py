"""The WAL archiver: a long-running service that streams the server's WAL over the replication
protocol and ships every segment to the storage backend.

    python -m tasks.wal.archiver            # run until SIGTERM / SIGINT
    python -m tasks.wal.archiver --once     # ship what the spool holds now (partial included), exit
    python -m tasks.wal.archiver --status   # print the archive's status as JSON, exit

``pg_receivewal --slot`` writes segments into ``wal.spool_dir``; the physical replication slot makes
the server keep every segment the archiver has not confirmed, so an archiver that is down (or
killed) loses nothing: on restart pg_receivewal resumes from the spool's ``.partial`` file or the
slot's position. The archiver ships each finished segment (zstd + sha256 record) and deletes it from
the spool only after the record is stored; the growing ``.partial`` segment is shipped every
``wal.partial_ship_seconds`` and on shutdown, so the archive's age (the RPO) stays within seconds
instead of a whole segment; a finished segment replaces its partial. A jump in segment numbers on
one timeline is logged as a gap and kept in the status file (``<spool>/archiver-status.json``).

pg_receivewal runs as a child that dies with the archiver (``PR_SET_PDEATHSIG``), and is restarted
after ``wal.restart_delay_seconds`` when it exits (server restart, network).

Before each start the archiver looks at the slot and the spool:

- a slot the server invalidated (``wal_status = 'lost'``: the archiver was down past
  ``max_slot_wal_keep_size``) cannot be streamed from again: the archiver retires the spool, drops and
  re-creates the slot, logs an error and records the gap (the archive needs a new base backup);
- with an empty spool (a new primary, a re-created slot, a lost spool volume) pg_receivewal would
  start at the slot's position, which can be past the archive's end: while the server still has the
  WAL from the archive's end on, the spool is seeded with that segment as ``.partial`` (its archived
  partial content, else zeros; pg_receivewal resumes from the newest file in its directory and
  rewrites it from the segment's start); otherwise the gap is recorded and streaming starts at the slot.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from tasks.commands import run_command
from tasks.errors import OpsError
from tasks.settings import OpsSettings, load_settings
from tasks.storage import Storage, open_storage
from tasks.wal import archive
from tasks.wal.names import (
    PARTIAL_SUFFIX,
    Segment,
    WalNameError,
    is_history_name,
    is_segment_name,
    parse_lsn,
    parse_segment,
    segment_of,
)
from tasks.wal.server import connect, tool_connection
from tasks.wal.status import SlotState, read_slot

logger = logging.getLogger("tasks.wal.archiver")
STATUS_FILE = "archiver-status.json"
_PR_SET_PDEATHSIG = 1
_HEARTBEAT_SECONDS = 30.0
# pg_receivewal's (the server's) words when the WAL it asked for is no longer in pg_wal.
_WAL_REMOVED = "has already been removed"


@dataclass(frozen=True)
class ServerPosition:
    """Where the server is and what the archiver's slot holds, as read before pg_receivewal starts."""

    current: Segment
    slot: SlotState

    @property
    def slot_start(self) -> Segment:
        """The segment pg_receivewal starts at with an empty spool: the slot's restart position
        (PostgreSQL 15 reads it with READ_REPLICATION_SLOT), else the server's current one."""
        if self.slot.restart_lsn is None:
            return self.current
        return segment_of(parse_lsn(self.slot.restart_lsn), self.current.timeline, self.current.segment_size)


def resume_segment(listing: archive.ArchiveListing, timeline: int, segment_size: int) -> Segment | None:
    """The first segment of ``timeline`` the archive does not hold whole: the one after its newest
    finished segment, or its newest partial one (None: nothing archived on that timeline)."""
    candidates = []
    for name in listing.segments:
        seg = parse_segment(name, segment_size)
        if seg.timeline == timeline:
            candidates.append(seg.next())
    for name in listing.partials:
        seg = parse_segment(name, segment_size)
        if seg.timeline == timeline:
            candidates.append(seg)
    return max(candidates, default=None)


@dataclass
class ArchiverStatus:
    """What the archiver has done; written to the spool after every change."""

    started_at: str
    slot: str
    storage: str
    last_segment: str | None = None
    last_segment_at: str | None = None
    partial_segment: str | None = None
    partial_at: str | None = None
    shipped: int = 0
    gaps: list[str] = field(default_factory=list)
    receiver_running: bool = False
    receiver_restarts: int = 0
    last_error: str | None = None
    heartbeat_at: str | None = None


def pass_wait(now: float, partial_shipped_at: float, partial_interval: float, poll: float) -> float:
    """How long the archiver sleeps between passes.

    ``poll`` seconds, but no later than the moment the partial segment is due again
    (``partial_shipped_at + partial_interval``), so that its cadence is the interval and not the
    interval rounded up to the next poll. Once due (the partial had not changed), ``poll`` again.
    """
    if partial_interval <= 0:
        return poll
    until_due = partial_shipped_at + partial_interval - now
    return min(poll, until_due) if until_due > 0 else poll


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the archiver dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Archiver:
    """Supervises pg_receivewal and ships what it writes. ``run`` until ``stop`` is set."""

    def __init__(self, settings: OpsSettings, storage: Storage | None = None) -> None:
        self.settings = settings
        self.cfg = settings.wal
        self.storage = storage or open_storage(settings.storage, attempts=settings.backup.upload_attempts)
        self.spool = Path(self.cfg.spool_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop = threading.Event()
        # The archiver's clock (monotonic seconds); tests give a fake one.
        self.clock: Callable[[], float] = time.monotonic
        self._partial_state: tuple[str, int, int] | None = None
        self._partial_shipped_at = 0.0
        self._last_by_timeline: dict[int, int] = {}
        self._status_written = 0.0
        self._stderr_thread: threading.Thread | None = None
        # The running pg_receivewal said the WAL it asked for is gone (reset at each start).
        self._receiver_wal_removed = False
        # Segments the server said it no longer has: never seeded again by this process.
        self._unavailable: set[str] = set()
        self.status = ArchiverStatus(
            started_at=datetime.now(UTC).isoformat(), slot=self.cfg.slot, storage=self.storage.location
        )

    # --- pg_receivewal ----------------------------------------------------------------------------

    def _slot_command(self, *action: str) -> None:
        conn = tool_connection(self.settings)
        run_command(
            [
                self.cfg.pg_receivewal,
                *action,
                f"--slot={self.cfg.slot}",
                "--no-password",
                f"--dbname={conn.url}",
            ],
            timeout=60,
            env=conn.env,
            secrets=conn.secrets,
        )

    def ensure_slot(self) -> None:
        """Create the physical slot if it does not exist (idempotent)."""
        self._slot_command("--create-slot", "--if-not-exists")

    def start_receiver(self) -> None:
        conn = tool_connection(self.settings)
        argv = [
            self.cfg.pg_receivewal,
            f"--directory={self.spool}",
            f"--slot={self.cfg.slot}",
            "--synchronous",
            "--no-loop",
            "--no-password",
            f"--status-interval={self.cfg.status_interval_seconds}",
            f"--dbname={conn.url}",
        ]
        logger.info("starting pg_receivewal into %s from %s (slot %s)", self.spool, conn.shown, self.cfg.slot)
        self.proc = subprocess.Popen(  # a service that runs as long as the archiver: not run_command
            argv,
            env={**os.environ, **conn.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        self._receiver_wal_removed = False
        self._stderr_thread = threading.Thread(
            target=self._log_stderr, args=(self.proc, conn.secrets), daemon=True
        )
        self._stderr_thread.start()
        self.status.receiver_running = True

    def _log_stderr(self, proc: subprocess.Popen[bytes], secrets: list[str]) -> None:
        from tasks.secrets import mask_text

        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            line = mask_text(raw.decode("utf-8", errors="replace").rstrip(), secrets)
            logger.info("[pg_receivewal] %s", line)
            if "error" in line.lower():
                self.status.last_error = line
                # Not the last line: "disconnected" follows the server's reason.
                self._receiver_wal_removed |= _WAL_REMOVED in line

    def stop_receiver(self, timeout: float = 15) -> None:
        """SIGINT lets pg_receivewal flush and close its partial file; SIGKILL after ``timeout``."""
        proc, self.proc = self.proc, None
        self.status.receiver_running = False
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    # --- the slot and where streaming starts ------------------------------------------------------

    def recreate_slot(self) -> None:
        """Drop the slot and create it again, at the server's current position."""
        self._slot_command("--drop-slot")
        self.ensure_slot()

    def server_position(self) -> ServerPosition:
        """The server's current segment (timeline, segment size) and the slot.

        Raises:
            WalServerError: the server cannot be reached (psycopg.Error: it refused the query).
        """
        with connect(self.settings, purpose="wal-archiver") as conn:
            row = conn.execute(
                "SELECT pg_walfile_name(pg_current_wal_lsn()), setting::bigint"
                " FROM pg_settings WHERE name = 'wal_segment_size'"
            ).fetchone()
            assert row is not None
            current = parse_segment(str(row[0]), int(row[1]))
            return ServerPosition(current, read_slot(conn, self.cfg.slot))

    def server_has(self, segment: Segment) -> bool | None:
        """Whether the server's pg_wal still holds ``segment`` (None: the role may not list pg_wal,
        which needs pg_monitor; then pg_receivewal's start tells)."""
        try:
            with connect(self.settings, purpose="wal-archiver") as conn:
                row = conn.execute("SELECT count(*) FROM pg_ls_waldir() WHERE name = %s", (segment.name,))
                found = row.fetchone()
        except psycopg.errors.InsufficientPrivilege:
            return None
        return bool(found and found[0])

    def spool_wal(self) -> list[Path]:
        """The WAL files in the spool that pg_receivewal would resume from (segments and partials)."""
        if not self.spool.is_dir():
            return []
        return [p for p in self.spool.iterdir() if is_segment_name(p.name.removesuffix(PARTIAL_SUFFIX))]

    def retire_spool(self, reason: str) -> None:
        """Ship what the spool holds, then remove its partial segments: pg_receivewal cannot continue
        them (the server no longer has their WAL), so it starts afresh from the slot."""
        self.ship_ready()
        self.ship_partial(force=True)
        for path in self.spool.glob("*" + PARTIAL_SUFFIX):
            path.unlink(missing_ok=True)
            logger.warning("removed %s from the spool: %s", path.name, reason)
        self._partial_state = None

    def recover_lost_slot(self) -> None:
        """Re-create an invalidated slot, after shipping what the spool holds."""
        logger.error(
            "replication slot %s is lost: the server removed WAL the archiver had not received (archiver"
            " down or behind past max_slot_wal_keep_size). Re-creating the slot and streaming from the"
            " server's current position; the archive has a gap from here: take a new base backup",
            self.cfg.slot,
        )
        self.status.last_error = f"replication slot {self.cfg.slot} was lost and re-created"
        self.retire_spool("the slot was lost")
        self.recreate_slot()

    def record_gap(self, first: Segment, start: Segment, reason: str) -> None:
        """Note that segments ``first`` up to (not including) ``start`` will never be received."""
        count = start.number - first.number
        gap = f"{first.name}..{start.name} (before {start.name}: {count} segments; {reason})"
        logger.error("WAL gap: segments %s were never received; the archive cannot replay across it", gap)
        self.status.gaps.append(gap)
        # The first segment received is the gap's end: not counted a second time when it is shipped.
        last = self._last_by_timeline.get(start.timeline, -1)
        self._last_by_timeline[start.timeline] = max(last, start.number - 1)
        self.write_status()

    def seed_spool(self, segment: Segment) -> None:
        """Make ``segment`` the spool's newest file, as ``.partial``, so pg_receivewal streams from its
        start. Its archived partial content when there is one, else zeros: until pg_receivewal rewrites
        it, shipping it changes nothing in the archive."""
        name = segment.name + PARTIAL_SUFFIX
        content = bytes(segment.segment_size)
        try:
            stored = archive.fetch(self.storage, name)
            if len(stored) == segment.segment_size:
                content = stored
        except OpsError:
            pass  # no archived partial of it (or an unreadable one): zeros, as pg_receivewal pads
        path = self.spool / name
        temp = path.with_suffix(".seed")
        temp.write_bytes(content)
        os.replace(temp, path)
        stat = path.stat()
        # Already what the archive has (or nothing worth shipping): not shipped before it changes.
        self._partial_state = (name, stat.st_mtime_ns, stat.st_size)
        logger.info("seeded the spool with %s: streaming continues where the archive ends", name)

    def prepare_start(self) -> None:
        """Before pg_receivewal (re)starts: re-create a lost slot; with an empty spool, continue from
        where the archive ends when the server still has that WAL, else record the gap."""
        reason = "the server no longer had this WAL when the archiver started"
        try:
            position = self.server_position()
            if position.slot.lost:
                self.recover_lost_slot()
                reason = f"slot {self.cfg.slot} was lost: the server removed this WAL before it was received"
                position = self.server_position()
            elif not position.slot.exists:
                self.ensure_slot()
                position = self.server_position()
            if self.spool_wal():
                return
            listing = archive.list_archive(self.storage)
            current = position.current
            resume = resume_segment(listing, current.timeline, current.segment_size)
            start = position.slot_start
            if resume is None or resume.number >= start.number or resume.number > current.number:
                return  # the slot starts where the archive ends (or the archive has no WAL of it)
            if resume.name not in self._unavailable and self.server_has(resume) is not False:
                self.seed_spool(resume)
                return
            self.record_gap(resume, start, reason)
        except (OpsError, psycopg.Error, WalNameError) as exc:
            # The server or the storage is down (pg_receivewal will say so, and be restarted), or the
            # role may not run the queries: start as before, from the spool or the slot.
            logger.warning("could not check the slot and the spool before streaming: %s", exc)

    def after_exit(self) -> None:
        """pg_receivewal exited: when it was because the WAL it started from is gone from the server,
        let the next start begin afresh (:meth:`prepare_start` then records the gap).

        pg_receivewal confirms its start position to the server before the server reads the WAL, and
        a physical slot takes that position as its own, even an older one: after such a start the
        slot points at removed WAL, so it is re-created (at the server's current position)."""
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=5)  # its last lines say why it exited
        if not self._receiver_wal_removed:
            return
        partials = sorted(self.spool.glob("*" + PARTIAL_SUFFIX))
        failed = partials[-1].name.removesuffix(PARTIAL_SUFFIX) if partials else None
        if failed is not None:
            self._unavailable.add(failed)
        self.retire_spool("the server no longer has the WAL it would continue from")
        try:
            position = self.server_position()
            start = position.slot_start
            size = position.current.segment_size
            if position.slot.exists and (
                failed is None or start.number <= parse_segment(failed, size).number
            ):
                logger.warning(
                    "slot %s points at WAL the server removed (%s): re-creating it", self.cfg.slot, start.name
                )
                self.recreate_slot()
        except (OpsError, psycopg.Error, WalNameError) as exc:
            logger.warning("could not check slot %s after pg_receivewal exited: %s", self.cfg.slot, exc)

    # --- shipping ---------------------------------------------------------------------------------

    def ship_ready(self) -> list[str]:
        """Ship every finished segment and history file in the spool, oldest first, then remove it."""
        shipped = self.retire_old_partials()
        names = sorted(p.name for p in self.spool.iterdir()) if self.spool.is_dir() else []
        for name in names:
            path = self.spool / name
            if is_history_name(name):
                archive.ship_file(self.storage, path, level=self.cfg.zstd_level)
            elif is_segment_name(name):
                record = archive.ship_file(self.storage, path, level=self.cfg.zstd_level)
                self._note_segment(name, record.raw_size_bytes)
                # The finished segment replaces the partial shipped for it.
                self.storage.delete(archive.record_key(name + PARTIAL_SUFFIX))
                self.storage.delete(archive.data_key(name + PARTIAL_SUFFIX))
                self.status.last_segment = name
                self.status.last_segment_at = record.shipped_at.isoformat()
                self.status.shipped += 1
            else:
                continue
            path.unlink()
            shipped.append(name)
            logger.info("shipped %s to %s", name, self.storage.location)
        if shipped:
            self.write_status()
        return shipped

    def retire_old_partials(self) -> list[str]:
        """Ship one last time, then remove, the growing segment of a timeline that ended.

        After a promotion pg_receivewal streams the old timeline up to the switch, leaves its last
        segment as ``.partial`` (it is never finished) and goes on with the new timeline's partial;
        once that exists the old one is closed for good and would lie in the spool forever.
        """
        partials = sorted(self.spool.glob("*" + PARTIAL_SUFFIX)) if self.spool.is_dir() else []
        if not partials:
            return []
        newest = partials[-1].name[:8]
        retired = []
        for path in partials[:-1]:
            if path.name[:8] >= newest:
                continue
            archive.ship_file(self.storage, path, level=self.cfg.zstd_level)
            path.unlink()
            retired.append(path.name)
            logger.info(
                "timeline of %s ended: shipped it a last time and removed it from the spool", path.name
            )
        return retired

    def _note_segment(self, name: str, segment_size: int) -> None:
        seg = parse_segment(name, segment_size)
        last = self._last_by_timeline.get(seg.timeline)
        if last is not None and seg.number > last + 1:
            first_missing = Segment(seg.timeline, last + 1, segment_size)
            gap = f"{first_missing.name}..{name} (before {name}: {seg.number - last - 1} segments)"
            logger.error("WAL gap: segments %s were never received; the archive cannot replay across it", gap)
            self.status.gaps.append(gap)
        self._last_by_timeline[seg.timeline] = max(seg.number, last or 0)

    def ship_partial(self, *, force: bool = False) -> str | None:
        """Ship the growing segment if it changed since the last ship (and the interval passed)."""
        partials = sorted(self.spool.glob("*" + PARTIAL_SUFFIX)) if self.spool.is_dir() else []
        if not partials:
            return None
        path = partials[-1]
        try:
            stat = path.stat()
        except FileNotFoundError:  # pg_receivewal renamed it just now: the next pass ships the segment
            return None
        state = (path.name, stat.st_mtime_ns, stat.st_size)
        begun = self.clock()
        due = force or (
            self.cfg.partial_ship_seconds > 0
            and begun - self._partial_shipped_at >= self.cfg.partial_ship_seconds
        )
        if state == self._partial_state or not due:
            return None
        try:
            record = archive.ship_file(self.storage, path, level=self.cfg.zstd_level)
        except FileNotFoundError:
            return None
        self._partial_state = state
        # Counted from the start of the ship: the interval is the cadence, the ship's own time (compress,
        # checksum, upload; long on a busy host) does not stretch it.
        self._partial_shipped_at = begun
        self.status.partial_segment = path.name
        self.status.partial_at = record.shipped_at.isoformat()
        self.write_status()
        return path.name

    def next_wait(self) -> float:
        """Seconds until the next pass: ``poll_seconds``, shortened to wake when the partial is due."""
        return pass_wait(
            self.clock(), self._partial_shipped_at, self.cfg.partial_ship_seconds, self.cfg.poll_seconds
        )

    def write_status(self) -> None:
        self.status.heartbeat_at = datetime.now(UTC).isoformat()
        self._status_written = time.monotonic()
        target = self.spool / STATUS_FILE
        temp = target.with_suffix(".tmp")
        temp.write_text(json.dumps(asdict(self.status), indent=2))
        os.replace(temp, target)

    # --- the service ------------------------------------------------------------------------------

    def run(self) -> None:
        """Ship until ``stop`` is set, restarting pg_receivewal when it exits; ship the partial last."""
        self.spool.mkdir(parents=True, exist_ok=True)
        self.ensure_slot()
        try:
            while not self.stop.is_set():
                if self.proc is None or self.proc.poll() is not None:
                    if self.proc is not None:
                        self.status.receiver_restarts += 1
                        self.status.receiver_running = False
                        self.write_status()
                        logger.warning(
                            "pg_receivewal exited %s; restarting in %ss",
                            self.proc.returncode,
                            self.cfg.restart_delay_seconds,
                        )
                        self.proc = None
                        self.after_exit()
                        if self.stop.wait(self.cfg.restart_delay_seconds):
                            break
                    self.prepare_start()
                    self.start_receiver()
                    self.write_status()
                try:
                    self.ship_ready()
                    self.ship_partial()
                except OpsError as exc:  # the storage is down: keep receiving, ship on the next pass
                    self.status.last_error = str(exc)
                    logger.error("shipping failed, will retry: %s", exc)
                if time.monotonic() - self._status_written > _HEARTBEAT_SECONDS:
                    self.write_status()  # liveness probes watch the file's age, also on an idle server
                self.stop.wait(self.next_wait())
        finally:
            self.stop_receiver()
            self.ship_ready()
            self.ship_partial(force=True)
            self.write_status()
            logger.info("archiver stopped; %s segments shipped this run", self.status.shipped)

    def once(self) -> ArchiverStatus:
        """Ship what the spool holds (finished segments, then the partial) without streaming."""
        self.ship_ready()
        self.ship_partial(force=True)
        return self.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.wal.archiver", description=__doc__.split("\n")[0])
    parser.add_argument("--once", action="store_true", help="ship what the spool holds now and exit")
    parser.add_argument("--status", action="store_true", help="print the archive's status as JSON and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        settings = load_settings()
        if args.status:
            from tasks.wal.status import archive_status

            print(archive_status(settings).model_dump_json(indent=2))
            return 0
        archiver = Archiver(settings)
        if args.once:
            print(json.dumps(asdict(archiver.once()), indent=2))
            return 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: archiver.stop.set())
        archiver.run()
    except OpsError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
