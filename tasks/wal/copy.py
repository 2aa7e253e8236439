"""The copy of a recovered database onto the app's server, by sections, with both sides counted and
hashed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tasks import backup, postgres
from tasks.backup import CONTENT_HASH_ALGORITHM, table_stats
from tasks.backup.database import _tool_version
from tasks.backup.restore.streams import _Alongside, _PgRestore
from tasks.commands import run_command
from tasks.errors import CommandError
from tasks.settings import OpsSettings
from tasks.wal.rows import STREAM_MIN_BYTES, copy_rows
from tasks.wal.scratch import Phases, ScratchServer


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
    release_source: Callable[[], None] | None = None,
    stream_min_bytes: int = STREAM_MIN_BYTES,
) -> CopyResult:
    """Copy ``source_db`` of the scratch instance into the empty ``dest_db`` on the app's server, by
    sections, and count and hash the tables of both.

    1. the schema (pre- and post-data sections, no rows) is dumped to a small file in ``workdir``,
       and its pre-data section (tables, types, functions, large objects) restored;
    2. the rows: each table of some size in its own binary ``COPY`` stream, several at once, the rest
       through ``pg_dump --section=data | pg_restore`` (:mod:`tasks.wal.rows`); the recovered instance's
       tables are read at the same time (nothing else writes to it), and once they are,
       ``release_source`` is called on a thread (the scratch instance is no longer needed);
    3. indexes, constraints and triggers are built from the schema file with ``backup.restore_jobs``
       jobs, while the copy's tables are read one statement each (their rows are all in; a table is
       locked only while it is read). A schema with row security is read after, as its policies
       change what a role sees.

    Raises:
        CommandError: pg_dump or pg_restore failed.
    """
    cfg = settings.backup
    phases = phases or Phases()
    # The copy's pg_restore must read what this pg_dump writes (the newest client may be newer).
    restore = _PgRestore.into(settings, dest_db, _tool_version(settings, cfg.pg_dump))
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
        with phases.timed("copy rows"):
            commands += copy_rows(
                settings,
                server.conninfo(source_db),
                dest_db,
                restore,
                source,
                stream_min_bytes=stream_min_bytes,
            )
        if release_source is not None:
            # The scratch instance is done with once its tables are read: stopped and removed meanwhile.
            def _release() -> None:
                reading_source.join(raise_error=False)
                release_source()

            _Alongside(_release)
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
