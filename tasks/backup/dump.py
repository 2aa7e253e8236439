"""Taking a backup: ``pg_dump`` streamed through zstd and sha256 into the storage, with the per-table
stats of the same snapshot, then the manifest."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Literal, TypeVar, cast

import psycopg
import zstandard

from tasks.backup.archive import _PIPE_CHUNK
from tasks.backup.database import (
    _connect,
    _pg_error,
    _require_database,
    _server,
    _settings_database,
    _tool_connection,
    _tool_version,
)
from tasks.backup.errors import BackupCorrupt, BackupError
from tasks.backup.manifest import (
    BackupManifest,
    TableStats,
    _storage,
    data_key,
    new_backup_id,
    read_manifest,
    write_manifest,
)
from tasks.backup.stats import CONTENT_HASH_ALGORITHM, table_stats
from tasks.backup.verify import verify_backup
from tasks.commands import stream_command
from tasks.pgtools import choose_client, server_major
from tasks.reports import Progress
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import ObjectWriter

_T = TypeVar("_T")


class _HashingWriter:
    """Counts and hashes what passes to the storage writer."""

    def __init__(self, target: ObjectWriter) -> None:
        self._target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self._target.write(data)
        return len(data)

    def flush(self) -> None:
        return None


def create_backup(
    settings: OpsSettings,
    *,
    database: str | None = None,
    verify: Literal["none", "checksum", "catalog", "restore"] = "catalog",
    content_hashes: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> BackupManifest:
    """Dump ``database`` into the storage and write its manifest; then verify it at ``verify``.

    pg_dump's custom format (uncompressed) is piped through in-process zstd and sha256 into the storage
    writer; the row counts and content hashes come from the snapshot pg_dump reads. The manifest is
    written only after the data object is complete, so an interrupted backup is never listed.

    Args:
        settings: the loaded settings.
        database: the database to dump; defaults to the one in ``postgres.dsn``.
        verify: verification to run and record right after the backup (``none`` skips it).
        content_hashes: also hash each table's rows (one more scan per table, in the same snapshot).
        on_progress: called with (bytes dumped so far, estimated total) as the dump runs.

    Returns:
        The manifest, with the verification recorded.

    Raises:
        DatabaseNotFound: the database does not exist (nothing is written).
        CommandError: pg_dump failed (the unfinished object is removed).
        StorageError: the storage refused the upload (a multipart upload is aborted).
        BackupCorrupt: the verification asked for failed (recorded in the manifest).
    """
    database = database or _settings_database(settings)
    _require_database(settings, database)
    storage = _storage(settings)
    logger = run_logger(__name__)
    cfg = settings.backup
    started = datetime.now(UTC)
    backup_id = new_backup_id(database, started)
    key = data_key(backup_id)
    dbname, env, secret_values = _tool_connection(settings, database)
    env["PGAPPNAME"] = "swagger2mcp-ops-pg_dump"
    algorithm = CONTENT_HASH_ALGORITHM if content_hashes else None
    progress = Progress(f"backup-{settings.stack}-progress", f"Dump of {database}")

    with _connect(settings, database, purpose="backup-snapshot") as snap:
        exported = _export_snapshot(snap, cfg.dump_timeout_seconds)
        snapshot, server_version, db_size = exported.snapshot, exported.server_version, exported.db_size
        # The server's own major: its archive is readable by that major's pg_restore anywhere.
        pg_dump = choose_client("pg_dump", cfg.pg_dump, server_major(server_version))
        pg_dump_version = _tool_version(settings, pg_dump.path)
        logger.info(
            "backup %s of %s: snapshot %s at WAL %s, database size %s bytes, %s",
            backup_id,
            database,
            snapshot,
            exported.lsn or "-",
            db_size,
            pg_dump_version,
        )
        argv = [
            pg_dump.path,
            "--format=custom",
            "--compress=0",
            f"--snapshot={snapshot}",
            "--no-password",
            f"--dbname={dbname}",
        ]
        written: _Written | None = None
        stats: Future[dict[str, TableStats]] | None = None
        try:
            with storage.open_write(key) as writer:
                with stream_command(
                    argv, timeout=cfg.dump_timeout_seconds, env=env, secrets=secret_values
                ) as cmd:
                    # Same connection, same transaction: the exported snapshot's view of every table.
                    stats = _in_background(
                        lambda: _snapshot_stats(snap, algorithm), name=f"stats-{backup_id}"
                    )
                    written = _compress_into(cmd.pipe, writer, settings, db_size, progress, on_progress)
                error = stats.exception()
                if error is not None:
                    # Raised inside the write: the unfinished object is removed, no manifest is written.
                    raise BackupError(
                        f"counting rows in the dump's snapshot failed: {_pg_error(error, settings)}"
                    )
        except BaseException:
            # Stop the counting query before the connection closes under it.
            if stats is not None and not stats.done():
                with contextlib.suppress(psycopg.Error):
                    snap.cancel_safe(timeout=5)
                wait([stats], timeout=10)
            raise
        with contextlib.suppress(psycopg.Error):
            snap.execute("COMMIT")
    # Both are set in the write, which raised otherwise.
    assert written is not None
    assert stats is not None
    finished = datetime.now(UTC)
    tables = stats.result()
    manifest = BackupManifest(
        id=backup_id,
        database=database,
        stack=settings.stack,
        source=_server(settings),
        started_at=started,
        finished_at=finished,
        size_bytes=written.size,
        raw_size_bytes=written.raw_size,
        sha256=written.sha256,
        data_key=key,
        pg_dump_version=pg_dump_version,
        server_version=server_version,
        snapshot=snapshot,
        snapshot_lsn=exported.lsn,
        snapshot_timeline=exported.timeline,
        snapshot_xids=exported.xids,
        system_identifier=exported.system_identifier,
        content_hash_algorithm=algorithm,
        tables=tables,
    )
    write_manifest(storage, manifest)
    progress.update(100.0)
    logger.info(
        "backup %s written: %s bytes (raw %s), %s tables, %s rows, %.1fs",
        backup_id,
        manifest.size_bytes,
        written.raw_size,
        len(tables),
        manifest.total_rows,
        (finished - started).total_seconds(),
    )
    if verify != "none":
        result = verify_backup(settings, backup_id, verify)
        if not result.ok:
            raise BackupCorrupt(
                f"backup {backup_id} was written but failed its {verify} verification: {result.detail}"
            )
        manifest = read_manifest(storage, backup_id)
    return manifest


@dataclass(frozen=True)
class _Exported:
    """The dump's snapshot and what was read in the statement that took it."""

    snapshot: str
    server_version: str
    db_size: int
    lsn: str | None
    timeline: int | None
    xids: str | None
    system_identifier: str | None


def _export_snapshot(snap: psycopg.Connection, timeout_seconds: float) -> _Exported:
    """Open the dump's REPEATABLE READ transaction on ``snap`` and export its snapshot.

    The WAL position is read in the same statement, after the snapshot was taken: the *insert*
    position, not ``pg_current_wal_lsn()`` (the write position, which an asynchronous commit the
    snapshot already sees may not have reached). So every commit the snapshot sees lies before it,
    and a recovery that stops just before it replays exactly those, plus at most the commits still
    leaving the server's list of running transactions at that instant, which ``pg_current_snapshot()``
    lets a drill name. A standby has no insert position: nothing is recorded there.
    """
    snap.execute(f"SET statement_timeout = {int(timeout_seconds * 1000)}")
    snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    # The counts and hashes run beside pg_dump: parallel workers would only take its CPU.
    snap.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    row = snap.execute(
        "SELECT pg_export_snapshot(), current_setting('server_version'),"
        " pg_database_size(current_database()),"
        " CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_insert_lsn()::text END,"
        " CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_insert_lsn()) END,"
        " pg_current_snapshot()::text, (pg_control_system()).system_identifier::text"
    ).fetchone()
    assert row is not None
    walfile = row[4]
    return _Exported(
        snapshot=str(row[0]),
        server_version=str(row[1]),
        db_size=int(row[2]),
        lsn=None if row[3] is None else str(row[3]),
        timeline=None if walfile is None else int(str(walfile)[:8], 16),
        xids=None if row[5] is None else str(row[5]),
        system_identifier=None if row[6] is None else str(row[6]),
    )


def _snapshot_stats(snap: psycopg.Connection, algorithm: str | None) -> dict[str, TableStats]:
    """Every table's counts (and hashes) and size, in the snapshot ``snap``'s transaction holds."""
    tables = table_stats(snap, algorithm=algorithm)
    # Sizes guide how a restore splits the data between its streams.
    for name, size in snap.execute(
        "SELECT n.nspname || '.' || c.relname, pg_table_size(c.oid) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r'"
    ).fetchall():
        if str(name) in tables:
            tables[str(name)].bytes = int(size)
    return tables


def _in_background(fn: Callable[[], _T], *, name: str) -> Future[_T]:
    """Run ``fn`` on a daemon thread (a query that does not end must not keep the process alive);
    its result, or its exception, in the future returned."""
    future: Future[_T] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


@dataclass(frozen=True)
class _Written:
    """What went into the storage: its size and sha256, and the size of the dump before compression."""

    size: int
    sha256: str
    raw_size: int


def _compress_into(
    pipe: IO[bytes],
    writer: ObjectWriter,
    settings: OpsSettings,
    db_size: int,
    progress: Progress,
    on_progress: Callable[[int, int], None] | None,
) -> _Written:
    """zstd-compress pg_dump's output into the storage writer, counting and hashing what is stored."""
    cfg = settings.backup
    compressor = zstandard.ZstdCompressor(level=cfg.zstd_level, threads=cfg.zstd_threads)
    sink = _HashingWriter(writer)
    raw_size = 0
    # zstd calls only write and flush on its target: the writer is file-like enough.
    with compressor.stream_writer(cast(IO[bytes], sink), closefd=False) as zwriter:
        while chunk := pipe.read(_PIPE_CHUNK):
            zwriter.write(chunk)
            raw_size += len(chunk)
            # The database size (indexes included) over-estimates the dump: a rough bar.
            progress.update(min(99.0, raw_size * 100 / max(db_size, 1)))
            if on_progress is not None:
                on_progress(raw_size, db_size)
    return _Written(sink.size, sink.sha.hexdigest(), raw_size)
