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

from tasks.commands import run_command
from tasks.errors import OpsError
from tasks.settings import OpsSettings, load_settings
from tasks.storage import Storage, open_storage
from tasks.wal import archive
from tasks.wal.names import PARTIAL_SUFFIX, Segment, is_history_name, is_segment_name, parse_segment
from tasks.wal.server import tool_connection

logger = logging.getLogger("tasks.wal.archiver")
STATUS_FILE = "archiver-status.json"
_PR_SET_PDEATHSIG = 1
_HEARTBEAT_SECONDS = 30.0


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
        self.status = ArchiverStatus(
            started_at=datetime.now(UTC).isoformat(), slot=self.cfg.slot, storage=self.storage.location
        )

    # --- pg_receivewal ----------------------------------------------------------------------------

    def ensure_slot(self) -> None:
        """Create the physical slot if it does not exist (idempotent)."""
        conn = tool_connection(self.settings)
        run_command(
            [
                self.cfg.pg_receivewal,
                "--create-slot",
                "--if-not-exists",
                f"--slot={self.cfg.slot}",
                "--no-password",
                f"--dbname={conn.url}",
            ],
            timeout=60,
            env=conn.env,
            secrets=conn.secrets,
        )

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
        threading.Thread(target=self._log_stderr, args=(self.proc, conn.secrets), daemon=True).start()
        self.status.receiver_running = True

    def _log_stderr(self, proc: subprocess.Popen[bytes], secrets: list[str]) -> None:
        from tasks.secrets import mask_text

        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            line = mask_text(raw.decode("utf-8", errors="replace").rstrip(), secrets)
            logger.info("[pg_receivewal] %s", line)
            if "error" in line.lower():
                self.status.last_error = line

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
                        if self.stop.wait(self.cfg.restart_delay_seconds):
                            break
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
