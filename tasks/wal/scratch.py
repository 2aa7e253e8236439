"""The scratch PostgreSQL a point-in-time restore replays into: the WAL staged for it while the base
backup unpacks, its configuration, start, promotion wait and removal (early, once the restore has
read it), and the phases a restore times."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from tasks.errors import OpsError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import Storage
from tasks.wal import archive
from tasks.wal.base import extract_base_backup

if TYPE_CHECKING:
    from tasks.wal.recover import PointPlan

_STOP_RE = re.compile(r"recovery stopping (?:before|after) .*")


class PointRestoreError(OpsError):
    """The restore to a point could not be done; the app's database was not touched."""


@dataclass
class Phases:
    """How long each phase of a restore to a point took, in the order they ran (seconds); the report
    shows them, so a slow restore says where its time went."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the time the block takes to phase ``name`` (also when it raises)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - started, 3)

    def describe(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items()) or "-"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _chown_tree(path: Path, uid: int, gid: int, *, skip: Path) -> None:
    """Give ``path`` and everything under it to the server's user, except ``skip`` (the WAL stager's
    directory: its files are given as they are staged, while this runs)."""
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if Path(root, d) != skip]
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


# The restore_command: WAL file $2 is staged into directory $1 by this process (fetched and checked
# against its record, see _WalStager); wait for it and hand it to PostgreSQL as $3. A name outside the
# plan is "not archived" at once (PostgreSQL probes for newer timelines' history files).
# Segments are moved (the stager keeps only a few ahead); history files are copied, as PostgreSQL
# may read one more than once.
_RESTORE_SCRIPT = """\
dir=$1 name=$2 target=$3
grep -qxF -- "$name" "$dir/.plan" || exit 1
case $name in *.history) ready=$dir/.histories ;; *) ready=$dir/.done ;; esac
while :; do
  if [ -f "$dir/$name" ]; then
    case $name in *.history) exec cp "$dir/$name" "$target" ;; *) exec mv "$dir/$name" "$target" ;; esac
  fi
  if [ -e "$ready" ]; then
    [ -f "$dir/$name" ] && continue
    exit 1
  fi
  sleep 0.02
done
"""


class _WalStager:
    """Fetches and checks the planned WAL into ``directory`` on a thread, ahead of the replay.

    Started before the base backup is unpacked, so fetching overlaps unpacking, and the recovery's
    restore_command is a small shell script (no interpreter started per segment, no storage
    credentials in the server's environment). At most ``ahead`` segments wait in the directory:
    the script moves each one out as recovery takes it, so a week of WAL never sits on disk at once.
    A failure (a segment missing or not matching its record) ends the staging; the script then
    answers "not archived", recovery stops, and :attr:`error` says why.
    """

    def __init__(
        self,
        storage: Storage,
        histories: list[str],
        segments: list[str],
        directory: Path,
        owner: pwd.struct_passwd | None,
        *,
        ahead: int = 8,
    ) -> None:
        self._storage = storage
        self._histories = histories
        self._segments = segments
        self.directory = directory
        self._owner = owner
        self._ahead = ahead
        self._stop = threading.Event()
        self.error: BaseException | None = None
        directory.mkdir()
        (directory / ".plan").write_text("".join(f"{n}\n" for n in [*histories, *segments]))
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        self._thread = threading.Thread(target=self._run, name="pitr-wal-stager", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _put(self, name: str) -> None:
        from tasks.wal.fetch import fetch_to

        temp = self.directory / f".staging-{name}"
        if not fetch_to(self._storage, name, temp):
            raise archive.SegmentMissing(f"WAL file {name} vanished from the archive after the check")
        if self._owner is not None:
            os.chown(temp, self._owner.pw_uid, self._owner.pw_gid)
        os.replace(temp, self.directory / name)

    def _wait_for_room(self, staged: list[str]) -> bool:
        """Wait until fewer than ``ahead`` staged segments are left; False when stopped."""
        while not self._stop.is_set():
            taken = [i for i, name in enumerate(staged) if not (self.directory / name).exists()]
            if taken:
                # Recovery took a later segment: any earlier one still here will not be asked for.
                for name in staged[: max(taken)]:
                    (self.directory / name).unlink(missing_ok=True)
                del staged[: max(taken) + 1]
            if len(staged) < self._ahead:
                return True
            self._stop.wait(0.02)
        return False

    def _run(self) -> None:
        try:
            for name in self._histories:
                self._put(name)
            (self.directory / ".histories").touch()
            staged: list[str] = []
            for name in self._segments:
                if not self._wait_for_room(staged):
                    return
                self._put(name)
                staged.append(name)
        except BaseException as exc:  # re-raised by the restore, which sees recovery stop
            self.error = exc
        finally:
            # Whatever is not staged by now is "not archived" to the restore_command.
            (self.directory / ".histories").touch()
            (self.directory / ".done").touch()


def _recovery_conf(
    plan: PointPlan, port: int, sockets: Path, scratch: Path, staged: Path, *, with_target: bool = True
) -> str:
    script = shlex.quote(str(scratch / "restore_wal.sh"))
    fetch = f'/bin/sh {script} {shlex.quote(str(staged))} "%f" "%p"'
    lines = [
        f"port = {port}",
        "listen_addresses = ''",
        f"unix_socket_directories = '{sockets}'",
        f"hba_file = '{scratch / 'pg_hba.conf'}'",
        f"ident_file = '{scratch / 'pg_ident.conf'}'",
        "restore_command = '" + fetch.replace("'", "''") + "'",
        "recovery_target_action = 'promote'",
        "recovery_target_timeline = 'latest'",
        "hot_standby = off",
        "archive_mode = off",
        "autovacuum = off",
        "fsync = off",
        "logging_collector = off",
        "log_timezone = 'UTC'",
    ]
    if with_target and plan.target_time is not None:
        lines.append(f"recovery_target_time = '{plan.target_time.astimezone(UTC).isoformat()}'")
    elif with_target and plan.target_xid is not None:
        # "Just before transaction X": its commit (or abort) record is not replayed.
        lines += [f"recovery_target_xid = '{plan.target_xid}'", "recovery_target_inclusive = off"]
    elif with_target:
        lines.append(f"recovery_target_lsn = '{plan.target_lsn}'")
        if not plan.inclusive:
            lines.append("recovery_target_inclusive = off")
    return "\n".join(lines) + "\n"


@dataclass
class ScratchServer:
    """The recovered instance: where to reach it and what it logged."""

    port: int
    sockets: Path
    user: str
    log_path: Path
    # The archive ended before the target (no WAL written after it): replayed to its end instead.
    ended_before_target: bool = False
    _release: Callable[[], None] | None = None
    _reached: str | None = None

    def conninfo(self, database: str) -> str:
        return f"host={self.sockets} port={self.port} user={self.user} dbname={database}"

    def release(self) -> None:
        """Stop the instance and remove its directory on a thread: the restore has read all it needs
        from it and goes on meanwhile (the end of :func:`scratch_server` waits for the removal)."""
        if self._release is not None:
            self._reached = self.reached()  # its log goes with it
            self._release()

    def reached(self) -> str:
        """Where recovery stopped, as the server logged it."""
        if self._reached is not None:
            return self._reached
        found = _STOP_RE.findall(self.log_path.read_text(errors="replace"))
        if found:
            return str(found[-1])
        if self.ended_before_target:
            return "end of the archived WAL, just before the target (no WAL record after it yet)"
        return "end of the archived WAL"


_ENDED_SHORT = "recovery ended before configured recovery target was reached"


@contextlib.contextmanager
def scratch_server(
    settings: OpsSettings,
    storage: Storage,
    plan: PointPlan,
    *,
    to_end_if_short: bool = False,
    phases: Phases | None = None,
) -> Iterator[ScratchServer]:
    """Unpack, configure and start the scratch PostgreSQL; yield once it has promoted; remove it all.

    Args:
        to_end_if_short: when the archive holds no WAL record at or after the target (nothing was
            written since), replay to the archive's end instead of failing: for an exclusive LSN
            target that is the same state. The server is started a second time without the target.
        phases: where the time of each phase is recorded (the restore report shows them).
    """
    logger = run_logger(__name__)
    phases = phases or Phases()
    cfg = settings.wal
    parent = cfg.scratch_dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    instance = _Instance(Path(tempfile.mkdtemp(prefix="ops-pitr-", dir=parent)))
    scratch = instance.scratch
    as_root = os.geteuid() == 0
    owner = pwd.getpwnam(cfg.server_os_user) if as_root else None
    histories = sorted(archive.list_archive(storage).histories)
    try:
        instance.stager = _WalStager(storage, histories, plan.segments, scratch / "wal", owner)
        instance.stager.start()
        data = scratch / "data"
        with phases.timed("unpack base backup"):
            extract_base_backup(storage, plan.base, data, timeout=cfg.recovery_timeout_seconds)
        with contextlib.suppress(FileNotFoundError):  # ALTER SYSTEM of production must not win over ours
            (data / "postgresql.auto.conf").rename(scratch / "postgresql.auto.conf.from-backup")
        (data / "recovery.signal").touch()
        sockets = scratch / "sock"
        sockets.mkdir()
        port = _free_port()
        user = urlsplit_user(settings)
        (scratch / "pg_hba.conf").write_text("local all all trust\n")
        (scratch / "pg_ident.conf").write_text("")
        (scratch / "restore_wal.sh").write_text(_RESTORE_SCRIPT)
        conf = scratch / "recovery.conf"
        conf.write_text(_recovery_conf(plan, port, sockets, scratch, instance.stager.directory))
        data.chmod(0o700)
        if owner is not None:
            _chown_tree(scratch, owner.pw_uid, owner.pw_gid, skip=instance.stager.directory)
        argv = [str(cfg.server_bin_dir / "postgres"), "-D", str(data), "-c", f"config_file={conf}"]
        if as_root:
            argv = ["runuser", "-u", cfg.server_os_user, "--", *argv]
        log_path = scratch / "server.log"
        server = ScratchServer(port, sockets, user, log_path, _release=instance.release)
        logger.info("starting the scratch PostgreSQL on port %s to replay to %s", port, plan.target)
        with phases.timed("start and replay WAL"):
            instance.proc = _start_postgres(argv, scratch, log_path)
            try:
                _wait_promoted(server, instance.proc, cfg.recovery_timeout_seconds, instance.stager)
            except PointRestoreError:
                proc = instance.proc
                if not (to_end_if_short and proc.poll() is not None and _ENDED_SHORT in _log_text(log_path)):
                    raise
                # The data directory stays in archive recovery: started again, it replays from its last
                # restartpoint to the archive's end and promotes (the WAL is staged again for it).
                logger.info("no WAL after %s in the archive yet: replaying to the archive's end", plan.target)
                instance.stager.stop()
                instance.stager = _WalStager(storage, histories, plan.segments, scratch / "wal-again", owner)
                instance.stager.start()
                conf.write_text(
                    _recovery_conf(plan, port, sockets, scratch, instance.stager.directory, with_target=False)
                )
                if owner is not None:
                    os.chown(conf, owner.pw_uid, owner.pw_gid)
                server.ended_before_target = True
                instance.proc = _start_postgres(argv, scratch, log_path)
                _wait_promoted(server, instance.proc, cfg.recovery_timeout_seconds, instance.stager)
        instance.stager.stop()
        logger.info("scratch PostgreSQL recovered: %s", server.reached())
        yield server
    finally:
        with phases.timed("remove scratch instance"):
            instance.finish()


class _Instance:
    """The scratch instance's process, directory and WAL stager, and their removal: at the end, or
    earlier on a thread once the restore has read all it needs (:meth:`ScratchServer.release`)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.proc: subprocess.Popen[bytes] | None = None
        self.stager: _WalStager | None = None
        self._removing: threading.Thread | None = None
        self._lock = threading.Lock()

    def _remove(self) -> None:
        if self.stager is not None:
            self.stager.stop()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # fast shutdown; nothing of it is kept
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def release(self) -> None:
        with self._lock:
            if self._removing is None:
                self._removing = threading.Thread(
                    target=self._remove, name="pitr-scratch-removal", daemon=True
                )
                self._removing.start()

    def finish(self) -> None:
        with self._lock:
            removing = self._removing
        if removing is None:
            self._remove()
        else:
            removing.join()


def _log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _start_postgres(argv: list[str], scratch: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(  # a server for the length of the restore: not run_command
            argv, cwd=scratch, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def urlsplit_user(settings: OpsSettings) -> str:
    """The role the tool uses on the app's server; it exists in the recovered cluster too."""
    from urllib.parse import urlsplit

    return urlsplit(settings.postgres.dsn.get_secret_value()).username or "postgres"


def _wait_promoted(
    server: ScratchServer, proc: subprocess.Popen[bytes], timeout: float, stager: _WalStager
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if stager.error is not None:
            # Recovery cannot get past the segment that failed: say which, rather than how it stopped.
            raise stager.error
        if proc.poll() is not None:
            tail = "\n".join(server.log_path.read_text(errors="replace").splitlines()[-15:])
            raise PointRestoreError(
                f"the scratch PostgreSQL stopped during recovery (exit {proc.returncode}); the app's database"
                f" was not touched. Its log ends:\n{tail}"
            )
        try:
            with psycopg.connect(server.conninfo("postgres"), connect_timeout=2, autocommit=True) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    return
        except psycopg.OperationalError:
            pass  # still replaying (hot_standby is off)
        if time.monotonic() > deadline:
            raise PointRestoreError(
                f"recovery did not finish within {timeout:.0f}s (wal.recovery_timeout_seconds)"
            )
        time.sleep(0.2)


# --- copy, compare, swap --------------------------------------------------------------------------
