"""The scratch PostgreSQL a point-in-time restore replays into: its configuration, start, promotion
wait and removal, and the phases a restore times."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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

ROOT = Path(__file__).resolve().parents[2]
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


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _storage_env(settings: OpsSettings) -> dict[str, str]:
    """``OPS_STORAGE__*`` for the restore_command: it reads the archive the way this run does."""
    env = {}
    for name, value in settings.storage.model_dump().items():
        if value is None:
            continue
        raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        env[f"OPS_STORAGE__{name.upper()}"] = str(raw)
    return env


def _server_user_runs_python(user: str | None) -> bool:
    """Whether the scratch server's OS user can run this interpreter (not when it lives under /root)."""
    if user is None:
        return True
    probe = subprocess.run(  # a quick probe, not a project command: no output to log
        ["runuser", "-u", user, "--", sys.executable, "-c", "import tasks.wal.fetch"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    return probe.returncode == 0


def _stage_wal(storage: Storage, plan: PointPlan, staged: Path) -> None:
    """Fetch and verify every planned segment (and the history files) into ``staged``.

    Used when the server's OS user cannot run the project's interpreter: the same checks as the
    restore_command, done by this process before the server starts.
    """
    from tasks.wal.fetch import fetch_to

    staged.mkdir()
    for name in [*archive.list_archive(storage).histories, *plan.segments]:
        if not fetch_to(storage, name, staged / name):
            raise archive.SegmentMissing(f"WAL file {name} vanished from the archive after the check")


def _fetch_command(staged: Path | None) -> str:
    if staged is None:
        return f'\'{sys.executable}\' -m tasks.wal.fetch "%f" "%p"'
    return f"cp '{staged}/%f' \"%p\""


def _recovery_conf(
    plan: PointPlan, port: int, sockets: Path, scratch: Path, staged: Path | None, *, with_target: bool = True
) -> str:
    fetch = _fetch_command(staged)
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

    def conninfo(self, database: str) -> str:
        return f"host={self.sockets} port={self.port} user={self.user} dbname={database}"

    def reached(self) -> str:
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
    scratch = Path(tempfile.mkdtemp(prefix="ops-pitr-", dir=parent))
    proc: subprocess.Popen[bytes] | None = None
    try:
        data = scratch / "data"
        with phases.timed("unpack base backup"):
            extract_base_backup(storage, plan.base, data)
        with contextlib.suppress(FileNotFoundError):  # ALTER SYSTEM of production must not win over ours
            (data / "postgresql.auto.conf").rename(scratch / "postgresql.auto.conf.from-backup")
        (data / "recovery.signal").touch()
        sockets = scratch / "sock"
        sockets.mkdir()
        port = _free_port()
        user = urlsplit_user(settings)
        (scratch / "pg_hba.conf").write_text("local all all trust\n")
        (scratch / "pg_ident.conf").write_text("")
        as_root = os.geteuid() == 0
        staged = None
        if not _server_user_runs_python(cfg.server_os_user if as_root else None):
            staged = scratch / "wal"
            logger.info(
                "%s cannot run %s: staging the checked WAL for recovery", cfg.server_os_user, sys.executable
            )
            with phases.timed("stage WAL"):
                _stage_wal(storage, plan, staged)
        conf = scratch / "recovery.conf"
        conf.write_text(_recovery_conf(plan, port, sockets, scratch, staged))
        data.chmod(0o700)
        owner = pwd.getpwnam(cfg.server_os_user) if as_root else None
        if owner is not None:
            _chown_tree(scratch, owner.pw_uid, owner.pw_gid)
        argv = [str(cfg.server_bin_dir / "postgres"), "-D", str(data), "-c", f"config_file={conf}"]
        if as_root:
            argv = ["runuser", "-u", cfg.server_os_user, "--", *argv]
        env = {**os.environ, **_storage_env(settings), "PYTHONPATH": str(ROOT)}
        log_path = scratch / "server.log"
        server = ScratchServer(port, sockets, user, log_path)
        logger.info("starting the scratch PostgreSQL on port %s to replay to %s", port, plan.target)
        with phases.timed("start and replay WAL"):
            proc = _start_postgres(argv, scratch, env, log_path)
            try:
                _wait_promoted(server, proc, cfg.recovery_timeout_seconds)
            except PointRestoreError:
                if not (to_end_if_short and proc.poll() is not None and _ENDED_SHORT in _log_text(log_path)):
                    raise
                # The data directory stays in archive recovery: started again, it replays from its last
                # restartpoint to the archive's end and promotes.
                logger.info("no WAL after %s in the archive yet: replaying to the archive's end", plan.target)
                conf.write_text(_recovery_conf(plan, port, sockets, scratch, staged, with_target=False))
                if owner is not None:
                    os.chown(conf, owner.pw_uid, owner.pw_gid)
                server.ended_before_target = True
                proc = _start_postgres(argv, scratch, env, log_path)
                _wait_promoted(server, proc, cfg.recovery_timeout_seconds)
        logger.info("scratch PostgreSQL recovered: %s", server.reached())
        yield server
    finally:
        with phases.timed("remove scratch instance"):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # fast shutdown; nothing of it is kept
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            shutil.rmtree(scratch, ignore_errors=True)


def _log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _start_postgres(
    argv: list[str], scratch: Path, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(  # a server for the length of the restore: not run_command
            argv, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def urlsplit_user(settings: OpsSettings) -> str:
    """The role the tool uses on the app's server; it exists in the recovered cluster too."""
    from urllib.parse import urlsplit

    return urlsplit(settings.postgres.dsn.get_secret_value()).username or "postgres"


def _wait_promoted(server: ScratchServer, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
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
