"""The parts of a restore's data load: pg_restore's arguments, the split of the data between two
streams, the watcher of loaded tables, the work run alongside, and the unlogged load."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from tasks.backup.archive import _PIPE_CHUNK, _data_entry, _Reading
from tasks.backup.database import _connect, _pg_error, _pg_restore_for, _tool_connection
from tasks.backup.manifest import BackupManifest
from tasks.backup.stats import _user_tables
from tasks.commands import CommandResult, StreamingCommand, run_command, stream_command
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import Storage


@dataclass(frozen=True)
class _PgRestore:
    """pg_restore into one database: its common arguments, the environment carrying the password, the
    secrets to mask and the timeout, so each step names only its own arguments."""

    program: str
    base: list[str]
    # The database's libpq URL without the password (``env`` carries it), for other client programs.
    dbname: str
    env: dict[str, str]
    secrets: list[str]
    timeout: float

    @classmethod
    def into(cls, settings: OpsSettings, database: str, pg_dump_version: str) -> _PgRestore:
        """pg_restore into ``database`` of the settings' server, for an archive written by the pg_dump
        whose ``--version`` line is ``pg_dump_version`` (the one a manifest records)."""
        cfg = settings.backup
        program = _pg_restore_for(settings, pg_dump_version)
        dbname, env, secret_values = _tool_connection(settings, database)
        env["PGAPPNAME"] = "swagger2mcp-ops-pg_restore"
        base = [program, "--exit-on-error", "--no-password", f"--dbname={dbname}"]
        return cls(program, base, dbname, env, secret_values, cfg.restore_timeout_seconds)

    def run(self, *args: str) -> CommandResult:
        """Run pg_restore with ``args`` to completion; the caller looks at ``ok``."""
        return run_command(
            [*self.base, *args], timeout=self.timeout, env=self.env, secrets=self.secrets, check=False
        )

    def stream(self, *args: str) -> contextlib.AbstractContextManager[StreamingCommand]:
        """pg_restore with ``args`` reading the archive from its stdin (raises CommandError on failure)."""
        return stream_command(
            [*self.base, *args], timeout=self.timeout, mode="write", env=self.env, secrets=self.secrets
        )

    def catalog(self, archive: str) -> str:
        """``pg_restore --list`` of an archive file (raises CommandError on failure)."""
        return run_command(
            [self.program, "--list", archive], timeout=self.timeout, env=self.env, secrets=self.secrets
        ).stdout


def _write_pieces(pipe: IO[bytes], pieces: Iterable[bytes], poll: Callable[[], None] | None = None) -> bool:
    """Write ``pieces`` to a pg_restore's stdin; False when it stopped reading (it had all it needed).

    Highly compressible data decompresses to large pieces: they are written in slices, so ``poll``
    notices a finished table while the next one loads, not after it.
    """
    for piece in pieces:
        view = memoryview(piece)
        for offset in range(0, len(view), _PIPE_CHUNK):
            try:
                pipe.write(view[offset : offset + _PIPE_CHUNK])
            except BrokenPipeError:
                return False
            if poll is not None:
                poll()
    return True


def _data_streams(settings: OpsSettings) -> int:
    configured = settings.backup.restore_data_streams
    if configured is not None:
        return configured
    return 2 if urlsplit(settings.storage.url).scheme == "file" else 1


@dataclass
class _DataSplit:
    """The data section in two pg_restore --use-list files: ``rest`` from the largest table on (its
    data and the data after it in the archive), and ``first``: everything else. The process given
    ``first`` stops reading once its entries are done, so neither reads through data it does not
    load, unless the largest table comes first (then ``first`` holds the data after it)."""

    rest: Path
    first: Path

    @classmethod
    def of(cls, manifest: BackupManifest, listing: str, beside: Path) -> _DataSplit | None:
        """Split when the archive has two or more tables with data and the largest is identifiable."""
        lines = [line for line in listing.splitlines() if line and not line.startswith(";")]
        carries_data = [" TABLE DATA " in line or " BLOBS " in line for line in lines]
        if sum(carries_data) < 2:
            return None
        ranked = sorted(
            manifest.tables.items(),
            key=lambda item: (item[1].bytes if item[1].bytes is not None else -1, item[1].rows),
            reverse=True,
        )
        if not ranked or ranked[0][1].rows == 0:
            return None
        name = ranked[0][0]
        marker = _data_entry(name)
        at = [i for i, line in enumerate(lines) if marker in line]
        # A name with spaces or dots could match another entry's line: only an unambiguous one splits.
        if "." in name.partition(".")[2] or len(at) != 1:
            return None
        start = at[0]
        if any(carries_data[:start]):
            rest = [line for i, line in enumerate(lines) if i >= start and carries_data[i]]
        else:
            rest = [lines[start]]
        first = [line for line in lines if line not in rest]
        paths = beside.with_suffix(".rest.list"), beside.with_suffix(".first.list")
        for path, chosen in zip(paths, (rest, first), strict=True):
            path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
        return cls(*paths)

    def remove(self) -> None:
        self.rest.unlink(missing_ok=True)
        self.first.unlink(missing_ok=True)


class _LargestTableStream:
    """A second pg_restore for the data from the largest table on, fed by its own reading on a thread."""

    def __init__(
        self,
        split: _DataSplit,
        restore: _PgRestore,
        storage: Storage,
        manifest: BackupManifest,
        *,
        verbose: bool,
    ) -> None:
        self._args = ["--section=data", "--use-list", str(split.rest), *(["--verbose"] if verbose else [])]
        self._restore = restore
        self._reading = _Reading(storage, manifest)
        self._stack = contextlib.ExitStack()
        self._feeder: _Alongside | None = None
        self._cmd: StreamingCommand | None = None

    def __enter__(self) -> _LargestTableStream:
        self._cmd = self._stack.enter_context(self._restore.stream(*self._args))
        return self

    def start(self, on_loaded: Callable[[str], None] | None) -> None:
        cmd = self._cmd
        assert cmd is not None
        loading = _LoadWatcher(cmd.stderr_reader.lines, on_loaded)

        def feed() -> None:
            if not _write_pieces(cmd.pipe, self._reading.pieces(), loading.poll):
                self._reading.drain()
            with contextlib.suppress(BrokenPipeError):
                cmd.pipe.close()
            # Its rows are committed once it exits cleanly: its tables can be read while others load.
            if cmd.proc.wait() == 0:
                loading.done()

        self._feeder = _Alongside(feed)

    def finish(self) -> str:
        """Wait for the load; check this reading's digest. Returns the masked command line."""
        assert self._feeder is not None
        assert self._cmd is not None
        self._feeder.join()
        self._stack.close()  # waits for pg_restore; raises CommandError when it failed
        self._reading.check()
        assert self._cmd.result is not None
        return self._cmd.result.command_line

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._stack.close()
            return
        # After a failure elsewhere: the exception passed into stream_command kills pg_restore's
        # process group and closes its pipe, so the feeder's next write fails and it ends.
        self._stack.__exit__(exc_type, exc, tb)
        if self._feeder is not None:
            self._feeder.join(raise_error=False)


def _make_tables_unlogged(settings: OpsSettings, database: str, catalog: str) -> bool:
    """Make every (still empty) table of ``database`` unlogged; all or none.

    A permanent table cannot reference an unlogged one, and a publication cannot list one: with a
    partitioned table (its parent stays permanent) or a ``PUBLICATION TABLE`` entry in ``catalog``
    (``pg_restore --list``), or when one table refuses (owned by a role this user cannot act for...),
    every table stays logged. Returns whether the tables are unlogged.
    """
    logger = run_logger(__name__)
    if " PUBLICATION TABLE " in catalog:
        logger.info("restore into %s: the dump publishes tables; loading every table logged", database)
        return False
    changed: list[sql.Composable] = []
    with _connect(settings, database, purpose="backup-restore") as conn:
        conn.autocommit = True
        if conn.execute("SELECT 1 FROM pg_class WHERE relkind = 'p' LIMIT 1").fetchone() is not None:
            logger.info("restore into %s: partitioned tables; loading every table logged", database)
            return False
        for schema, table in _user_tables(conn):
            ident = sql.Identifier(schema, table)
            try:
                conn.execute(sql.SQL("ALTER TABLE ONLY {} SET UNLOGGED").format(ident))
            except psycopg.Error as exc:
                logger.info(
                    "restore into %s: %s.%s stays logged (%s); loading every table logged",
                    database,
                    schema,
                    table,
                    _pg_error(exc, settings),
                )
                for done in changed:
                    conn.execute(sql.SQL("ALTER TABLE ONLY {} SET LOGGED").format(done))
                return False
            changed.append(ident)
    return True


# pg_restore --verbose, non-parallel: 'processing data for table "schema.table"' before each COPY. The
# COPY before it has returned, so (autocommit) its rows are committed.
_DATA_LINE = re.compile(r'processing data for table "(.+)"$')


class _LoadWatcher:
    """Reports each table whose COPY finished, from pg_restore's verbose stderr lines."""

    def __init__(self, lines: Iterable[str], callback: Callable[[str], None] | None) -> None:
        self._lines = lines
        self._callback = callback
        self._seen: list[str] = []
        self._count = -1

    def poll(self) -> None:
        if self._callback is None:
            return
        try:
            lines = list(self._lines)  # a copy: the reader thread appends to the deque
        except RuntimeError:  # appended to while copied: look again after the next chunk
            return
        if len(lines) == self._count:
            return
        self._count = len(lines)
        for line in lines:
            found = _DATA_LINE.search(line)
            if found and found.group(1) not in self._seen:
                if self._seen:
                    self._callback(self._seen[-1])
                self._seen.append(found.group(1))

    def done(self) -> None:
        """pg_restore exited cleanly: its last table is loaded too."""
        self.poll()
        if self._callback is not None and self._seen:
            self._callback(self._seen[-1])


class _Alongside:
    """Runs a callable on a thread; ``join`` waits for it and re-raises its exception."""

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if fn is not None:

            def _run() -> None:
                try:
                    fn()
                except BaseException as exc:  # re-raised on the calling thread
                    self._error = exc

            self._thread = threading.Thread(target=_run, name="restore-alongside", daemon=True)
            self._thread.start()

    def join(self, *, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
        if raise_error and self._error is not None:
            raise self._error
