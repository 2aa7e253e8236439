"""Restoring an archive into an empty database, one function per strategy, and comparing the result
with the manifest."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tasks.backup.archive import _PIPE_CHUNK, _Reading
from tasks.backup.manifest import BackupManifest, TableStats
from tasks.backup.restore.streams import (
    _Alongside,
    _data_streams,
    _DataSplit,
    _LargestTableStream,
    _LoadWatcher,
    _make_tables_unlogged,
    _PgRestore,
    _write_pieces,
)
from tasks.backup.stats import TableComparison, _RestoredTableStats, compare_stats
from tasks.errors import CommandError
from tasks.settings import OpsSettings
from tasks.storage import Storage

# How much of the start of an archive is kept for a parallel post-data restore (the catalog sits there).
_CATALOG_LIMIT = 64 * 1024 * 1024


def restore_into(
    settings: OpsSettings,
    storage: Storage,
    manifest: BackupManifest,
    database: str,
    *,
    on_table_loaded: Callable[[str], None] | None = None,
    alongside_post_data: Callable[[], None] | None = None,
    unlogged_load: bool = False,
) -> list[str]:
    """Restore the backup into the existing empty ``database``; the object's checksum is checked too.

    The dump is streamed into pg_restore's stdin. With ``backup.restore_jobs`` above 1 the archive's
    first bytes (its catalog) are kept in a small file in ``backup.spool_dir``: the pre-data section
    (tables, types, functions) is restored from it, then the data streams in, then indexes and
    constraints are built with ``pg_restore --jobs`` from the same file, which is removed afterwards.

    ``on_table_loaded`` is called with ``schema.table`` as soon as a table's rows are committed (with
    ``restore_jobs`` above 1; pg_restore reports each table it starts, so the one before is done).
    ``alongside_post_data`` runs once all rows are loaded (and checksummed), on a thread at the same
    time as the post-data section (after the whole restore with ``restore_jobs`` 1); its exception, if
    any, is raised after pg_restore finished. ``unlogged_load`` (for a copy that is dropped right
    after, with ``restore_jobs`` above 1) makes the tables unlogged before their rows load: the load
    and the index builds write no WAL, so a drill neither waits on WAL nor floods replicas and WAL
    archives with it. Where any table cannot be unlogged, every table stays as the dump made it.

    Returns:
        The masked command lines that ran.

    Raises:
        BackupCorrupt: the object does not match its manifest.
        CommandError: pg_restore failed.
    """
    restore = _PgRestore.into(settings, database, manifest.pg_dump_version)
    if settings.backup.restore_jobs <= 1:
        return _restore_in_one_stream(restore, _Reading(storage, manifest), alongside_post_data)
    spool_root = settings.backup.spool_dir or Path(tempfile.gettempdir())
    spool_root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=spool_root, prefix=f"{manifest.id}-", suffix=".catalog") as file:
        reading = _Reading(storage, manifest)
        pieces = reading.pieces()
        head = _spool_head(file, pieces)
        pre = restore.run("--section=pre-data", head.path)
        commands = [pre.command_line]
        if pre.ok:
            commands += _load_data_after_schema(
                restore,
                settings,
                storage,
                manifest,
                database,
                head,
                reading,
                pieces,
                on_table_loaded=on_table_loaded,
                unlogged_load=unlogged_load,
            )
        elif head.whole:
            raise CommandError(
                f"pg_restore exited {pre.returncode}: {pre.command_line}\n{pre.stderr[-4000:]}"
            )
        else:
            pieces.close()
            commands.append(
                _load_schema_and_data(restore, _Reading(storage, manifest), on_table_loaded=on_table_loaded)
            )
        # Every row is in and checksummed: work that reads only the data (the drill's counts and
        # hashes) overlaps the index builds instead of following them.
        alongside = _Alongside(alongside_post_data)
        try:
            post = restore.run("--section=post-data", f"--jobs={settings.backup.restore_jobs}", head.path)
            commands.append(post.command_line)
            if not post.ok and head.whole:
                raise CommandError(
                    f"pg_restore exited {post.returncode}: {post.command_line}\n{post.stderr[-4000:]}"
                )
        finally:
            alongside.join(raise_error=False)
    if not post.ok:
        # A catalog larger than the copy kept: read the archive again for the post-data section.
        commands.append(_post_data_from_a_new_reading(restore, storage, manifest))
    alongside.join()
    return commands


def _restore_in_one_stream(
    restore: _PgRestore, reading: _Reading, alongside_post_data: Callable[[], None] | None
) -> list[str]:
    """``restore_jobs`` 1: the whole archive through one pg_restore, then the work alongside."""
    with restore.stream() as cmd:
        for piece in reading.pieces():
            cmd.pipe.write(piece)
        reading.check()
    assert cmd.result is not None
    if alongside_post_data is not None:
        alongside_post_data()
    return [cmd.result.command_line]


@dataclass(frozen=True)
class _Head:
    """The archive's first bytes, kept in a file for the pre-data and post-data sections."""

    path: str
    # The part of the piece that crossed the limit (not in the file): the data stream sends it next.
    rest: bytes
    # The whole archive fits in the file (so a failure reading it is the archive's, not the limit's).
    whole: bool


def _spool_head(file: IO[bytes], pieces: Iterator[bytes]) -> _Head:
    """Write the archive's first bytes up to ``_CATALOG_LIMIT``, which hold its catalog (an archive
    smaller than that is held whole). Post-data entries, and pre-data ones, carry no data: the catalog
    is all pg_restore needs for them."""
    kept, rest = 0, b""
    for piece in pieces:
        room = _CATALOG_LIMIT - kept
        file.write(piece[:room])
        kept += min(len(piece), room)
        if kept >= _CATALOG_LIMIT:
            rest = piece[room:]
            break
    file.flush()
    return _Head(file.name, rest, kept < _CATALOG_LIMIT)


def _head_then_rest(head: _Head, pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The archive again from its start: the kept head, then the rest of the same reading."""
    with open(head.path, "rb") as again:
        while block := again.read(_PIPE_CHUNK):
            yield block
    if head.rest:
        yield head.rest
    yield from pieces


def _load_data_after_schema(
    restore: _PgRestore,
    settings: OpsSettings,
    storage: Storage,
    manifest: BackupManifest,
    database: str,
    head: _Head,
    reading: _Reading,
    pieces: Iterator[bytes],
    *,
    on_table_loaded: Callable[[str], None] | None,
    unlogged_load: bool,
) -> list[str]:
    """The pre-data section is in (from the head): load the data section from the rest of ``reading``,
    the largest table on its own stream from a second reading when the data splits in two."""
    listing = restore.catalog(head.path)
    if unlogged_load:
        _make_tables_unlogged(settings, database, listing)
    split = _DataSplit.of(manifest, listing, Path(head.path)) if _data_streams(settings) > 1 else None
    feed = _head_then_rest(head, pieces)
    if split is None:
        return [_stream_data(restore, ["--section=data"], feed, reading, on_table_loaded)]
    with contextlib.ExitStack() as streams:
        streams.callback(split.remove)
        # The largest table loads from its own reading of the object, at the same time.
        largest = streams.enter_context(
            _LargestTableStream(split, restore, storage, manifest, verbose=on_table_loaded is not None)
        )
        largest.start(on_table_loaded)
        first = _stream_data(
            restore, ["--section=data", "--use-list", str(split.first)], feed, reading, on_table_loaded
        )
        return [first, largest.finish()]


def _load_schema_and_data(
    restore: _PgRestore, reading: _Reading, *, on_table_loaded: Callable[[str], None] | None
) -> str:
    """A catalog larger than the head: pre-data and data from one stream, a new reading of the object."""
    return _stream_data(
        restore, ["--section=pre-data", "--section=data"], reading.pieces(), reading, on_table_loaded
    )


def _stream_data(
    restore: _PgRestore,
    args: list[str],
    feed: Iterable[bytes],
    reading: _Reading,
    on_table_loaded: Callable[[str], None] | None,
) -> str:
    """Feed one pg_restore of ``args``, reporting each table whose rows are committed; check the
    reading's digest. Returns the masked command line."""
    verbose = ["--verbose"] if on_table_loaded is not None else []
    with restore.stream(*args, *verbose) as cmd:
        loading = _LoadWatcher(cmd.stderr_reader.lines, on_table_loaded)
        if not _write_pieces(cmd.pipe, feed, loading.poll):
            reading.drain()  # pg_restore needed no more of it; the checksum needs it all
        reading.check()
    assert cmd.result is not None
    loading.done()
    return cmd.result.command_line


def _post_data_from_a_new_reading(restore: _PgRestore, storage: Storage, manifest: BackupManifest) -> str:
    """The post-data section from a new reading of the object (its catalog did not fit the head)."""
    with restore.stream("--section=post-data") as cmd:
        for piece in _Reading(storage, manifest).pieces():
            try:
                cmd.pipe.write(piece)
            except BrokenPipeError:
                break  # pg_restore read the catalog it needs and finished
    assert cmd.result is not None
    return cmd.result.command_line


def _restore_and_compare(
    settings: OpsSettings, storage: Storage, manifest: BackupManifest, database: str, *, unlogged_load: bool
) -> tuple[list[str], TableComparison]:
    """:func:`restore_into` the empty ``database`` and compare its tables with the manifest.

    Counting and hashing read only the data: each table as soon as its rows are in, the rest while
    pg_restore builds indexes and constraints (nothing but the restore writes to the new database).

    Returns:
        The masked command lines that ran, and the comparison.

    Raises:
        CommandError: pg_restore failed.
        BackupCorrupt: the object does not match its manifest.
    """
    box: dict[str, dict[str, TableStats]] = {}
    collector = _RestoredTableStats(settings, database, manifest)

    def _finish() -> None:
        box["actual"] = collector.finish()

    try:
        commands = restore_into(
            settings,
            storage,
            manifest,
            database,
            on_table_loaded=collector.table_loaded,
            alongside_post_data=_finish,
            unlogged_load=unlogged_load,
        )
    finally:
        collector.stop()
    return commands, compare_stats(manifest.tables, box["actual"], database=database, backup_id=manifest.id)
