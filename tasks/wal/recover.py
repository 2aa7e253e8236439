"""Restore a database to a moment: replay the archive into a scratch PostgreSQL, then take the
logical backups' proven path onto the app's server.

1. plan (reads only): pick the newest base backup finished before the target, list every WAL
   segment from its start to the target, and check each is archived and matches its checksums: a
   missing or corrupt segment is named here, before anything is unpacked or started;
2. unpack the base backup into a scratch data directory (sha256 checked), write ``recovery.signal``
   and a configuration of our own (``restore_command`` = ``python -m tasks.wal.fetch``, the
   target, ``recovery_target_action = promote``, a private port and socket directory), start
   ``postgres`` (same major) as ``wal.server_os_user`` and wait until it has promoted;
3. copy the database logically (``pg_dump | pg_restore``) into a new database on the app's server,
   compare every table's row count and content hash with the scratch instance, then swap the two by
   rename under the database's advisory lock (``tasks.backup``); the replaced database is kept.

The scratch instance and directory are removed at the end, also on failure.
"""

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
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from tasks import backup, postgres
from tasks.backup import CONTENT_HASH_ALGORITHM, TableComparison, compare_stats, table_stats
from tasks.backup.database import _maintenance, _scratch_database
from tasks.backup.restore.streams import _Alongside, _PgRestore
from tasks.backup.restore.swap import _database_owner, _swap
from tasks.commands import run_command, stream_command
from tasks.errors import CommandError, OpsError, ParameterError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import Storage, open_storage
from tasks.wal import archive, targets
from tasks.wal import tables as side_tables
from tasks.wal.base import BaseBackupManifest, extract_base_backup, list_base_backups
from tasks.wal.names import WalNameError, format_lsn, parse_lsn, parse_segment, segment_of, segments_between

ROOT = Path(__file__).resolve().parents[2]
_STOP_RE = re.compile(r"recovery stopping (?:before|after) .*")
_PIPE = 1 << 20


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

    def steps(self) -> list[str]:
        replay = [
            f"unpack base backup {self.base.id} (finished {self.base.finished_at:%Y-%m-%d %H:%M:%S} UTC,"
            f" WAL from {self.base.start_lsn}) into a scratch data directory",
            f"replay {len(self.segments)} archived WAL segments ({self.segments[0]}..{self.segments[-1]})"
            f" to {self.target} in a scratch PostgreSQL",
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
    window = targets.restorable_window(bases, listing)
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
    if lsn is not None:
        last = segment_of(lsn, base.timeline, size)
    else:
        assert target_time is not None
        # The first segment shipped after the target holds it (or the first commit after it).
        later = sorted(
            n for n, info in listing.segments.items() if n >= base.start_wal and info.modified >= target_time
        )
        partial = [n for n, info in listing.partials.items() if info.modified >= target_time]
        if later:
            last = parse_segment(later[0], size)
        elif partial:
            last = parse_segment(max(partial), size)
        else:
            raise PointRestoreError(
                f"{target} is past the newest archived WAL; {window.describe()}. Pick an earlier time or"
                " check the archiver. Nothing was touched"
            )
    last = max(last, parse_segment(base.stop_wal, size))
    names = [s.name for s in segments_between(first, last)]
    check = archive.check_segments(storage, names)
    if not check.ok:
        raise archive.WalArchiveError(
            f"restore to {target} from base backup {base.id} is not possible: {check.summary()}."
            " Nothing was touched; pick a target before the first missing segment, or a later base backup"
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
    )


# --- the scratch instance -------------------------------------------------------------------------


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


def _recovery_conf(plan: PointPlan, port: int, sockets: Path, scratch: Path, staged: Path | None) -> str:
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
    if plan.target_time is not None:
        lines.append(f"recovery_target_time = '{plan.target_time.astimezone(UTC).isoformat()}'")
    elif plan.target_xid is not None:
        # "Just before transaction X": its commit (or abort) record is not replayed.
        lines += [f"recovery_target_xid = '{plan.target_xid}'", "recovery_target_inclusive = off"]
    else:
        lines.append(f"recovery_target_lsn = '{plan.target_lsn}'")
    return "\n".join(lines) + "\n"


@dataclass
class ScratchServer:
    """The recovered instance: where to reach it and what it logged."""

    port: int
    sockets: Path
    user: str
    log_path: Path

    def conninfo(self, database: str) -> str:
        return f"host={self.sockets} port={self.port} user={self.user} dbname={database}"

    def reached(self) -> str:
        found = _STOP_RE.findall(self.log_path.read_text(errors="replace"))
        return found[-1] if found else "end of the archived WAL"


@contextlib.contextmanager
def scratch_server(
    settings: OpsSettings, storage: Storage, plan: PointPlan, *, phases: Phases | None = None
) -> Iterator[ScratchServer]:
    """Unpack, configure and start the scratch PostgreSQL; yield once it has promoted; remove it all."""
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
        (scratch / "recovery.conf").write_text(_recovery_conf(plan, port, sockets, scratch, staged))
        data.chmod(0o700)
        if as_root:
            owner = pwd.getpwnam(cfg.server_os_user)
            _chown_tree(scratch, owner.pw_uid, owner.pw_gid)
        argv = [
            str(cfg.server_bin_dir / "postgres"),
            "-D",
            str(data),
            "-c",
            f"config_file={scratch / 'recovery.conf'}",
        ]
        if as_root:
            argv = ["runuser", "-u", cfg.server_os_user, "--", *argv]
        env = {**os.environ, **_storage_env(settings), "PYTHONPATH": str(ROOT)}
        log_path = scratch / "server.log"
        logger.info("starting the scratch PostgreSQL on port %s to replay to %s", port, plan.target)
        server = ScratchServer(port, sockets, user, log_path)
        with phases.timed("start and replay WAL"):
            with log_path.open("wb") as log:
                proc = subprocess.Popen(  # a server for the length of the restore: not run_command
                    argv, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
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


@dataclass(frozen=True)
class CopyResult:
    """The copy of the recovered database and both sides' per-table counts and content hashes."""

    commands: list[str]
    expected: dict[str, backup.TableStats]
    actual: dict[str, backup.TableStats]


def _copy_and_read(
    settings: OpsSettings,
    server: ScratchServer,
    source_db: str,
    dest_db: str,
    *,
    workdir: Path,
    phases: Phases | None = None,
) -> CopyResult:
    """Copy ``source_db`` of the scratch instance into the empty ``dest_db`` on the app's server, by
    sections, and count and hash the tables of both.

    1. the schema (pre- and post-data sections, no rows) is dumped to a small file in ``workdir``,
       and its pre-data section (tables, types, functions, large objects) restored;
    2. the rows stream ``pg_dump --section=data | pg_restore`` with no file and no compression; the
       recovered instance's tables are read at the same time (nothing else writes to it);
    3. indexes, constraints and triggers are built from the schema file with ``backup.restore_jobs``
       jobs, while the copy's tables are read one statement each (their rows are all in; a table is
       locked only while it is read). A schema with row security is read after, as its policies
       change what a role sees.

    Raises:
        CommandError: pg_dump or pg_restore failed.
    """
    cfg = settings.backup
    phases = phases or Phases()
    restore = _PgRestore.into(settings, dest_db)
    schema = workdir / "schema.dump"
    source = [cfg.pg_dump, "--no-password", f"--dbname={server.conninfo(source_db)}"]
    timeout = cfg.restore_timeout_seconds
    copy_dsn = postgres.libpq_dsn(settings.postgres.dsn.get_secret_value(), database=dest_db)
    commands: list[str] = []
    box: dict[str, dict[str, backup.TableStats]] = {}

    def _read_source() -> None:
        box["expected"] = _stats(server.conninfo(source_db))

    def _read_copy() -> None:
        box["actual"] = _stats(copy_dsn, snapshot=False)

    with phases.timed("copy schema"):
        dumped = run_command(
            [*source, "--format=custom", "--section=pre-data", "--section=post-data", f"--file={schema}"],
            timeout=timeout,
        )
        commands.append(dumped.command_line)
        pre = restore.run("--section=pre-data", str(schema))
        commands.append(pre.command_line)
        if not pre.ok:
            raise CommandError(
                f"pg_restore exited {pre.returncode}: {pre.command_line}\n{pre.stderr[-4000:]}"
            )
        catalog = restore.catalog(str(schema))
        secured = " ROW SECURITY " in catalog or " POLICY " in catalog
    reading_source = _Alongside(_read_source)
    reading_copy = _Alongside(None)
    try:
        with (
            phases.timed("copy rows"),
            stream_command(
                [*source, "--format=custom", "--compress=0", "--section=data"], timeout=timeout
            ) as out,
            restore.stream("--section=data") as into,
        ):
            while chunk := out.pipe.read(_PIPE):
                into.pipe.write(chunk)
        commands += [" ".join(out.argv), " ".join(into.argv)]
        if not secured:
            reading_copy = _Alongside(_read_copy)
        with phases.timed("build indexes and constraints"):
            post = restore.run("--section=post-data", f"--jobs={max(1, cfg.restore_jobs)}", str(schema))
            commands.append(post.command_line)
            if not post.ok:
                raise CommandError(
                    f"pg_restore exited {post.returncode}: {post.command_line}\n{post.stderr[-4000:]}"
                )
    except BaseException:
        reading_source.join(raise_error=False)
        reading_copy.join(raise_error=False)
        raise
    # What is left of the reading once the copy is done.
    with phases.timed("compare tables"):
        reading_source.join()
        reading_copy.join()
        if secured:
            _read_copy()
    return CopyResult(commands, box["expected"], box["actual"])


def _stats(conninfo: str, *, snapshot: bool = True) -> dict[str, backup.TableStats]:
    """Counts and content hashes of every table: in one snapshot, or (``snapshot=False``, for a copy
    nothing but the restore writes to) one statement per table, so that no table stays locked."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if not snapshot:
            return table_stats(conn, algorithm=CONTENT_HASH_ALGORITHM)
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return table_stats(conn, algorithm=CONTENT_HASH_ALGORITHM)


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
                copied = _copy_and_read(
                    settings, server, target, copy, workdir=server.sockets.parent, phases=phases
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
