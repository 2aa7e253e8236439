"""Database references: which planned files the application's database still uses (kept)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import psycopg
from psycopg import sql

from tasks import postgres
from tasks.settings import PostgresSettings, UploadsSettings
from tasks.uploads.errors import ReferenceCheckFailed
from tasks.uploads.records import FileEntry, _is_utf8
from tasks.uploads.scan import ScanStats

REFERENCE_BATCH = 2000


class ReferenceChecker:
    """Asks the application's database which of a batch of relative paths it still references.

    The configured query runs as a subquery filtered with ``path = ANY(%s)``, one round trip per batch,
    so memory stays bounded and an index on the referenced column is used. A stored value matches as
    the relative path itself or as ``reference_prefix`` + relative path. A name that is not valid UTF-8
    cannot be stored in a text column and so is never referenced.
    """

    def __init__(self, conn: psycopg.Connection, query: str, prefix: str | None, pg: PostgresSettings):
        self._conn = conn
        self._pg = pg
        self._prefix = prefix or ""
        body = query.strip().rstrip(";").strip().replace("%", "%%")
        self._statement = sql.SQL(
            "SELECT refs.path FROM ({}) AS refs(path) WHERE refs.path = ANY(%s)"
        ).format(
            sql.SQL(body)  # operator-configured SQL, not user input
        )

    def referenced(self, rels: Iterable[str]) -> set[str]:
        """The subset of ``rels`` the database references now.

        Raises:
            ReferenceCheckFailed: the query failed; nothing may be removed on a guess.
        """
        forms: dict[str, str] = {}
        for rel in rels:
            if _is_utf8(rel):
                forms[rel] = rel
                if self._prefix:
                    forms[self._prefix + rel] = rel
        if not forms:
            return set()
        try:
            rows = self._conn.execute(self._statement, [list(forms)]).fetchall()
        except psycopg.Error as exc:
            raise ReferenceCheckFailed(
                f"the reference query failed ({postgres.safe_error(exc, self._pg)}); nothing was removed."
                " Fix uploads.reference_query (it must return the stored paths in its first column)"
            ) from None
        return {forms[row[0]] for row in rows if row[0] in forms}


@contextlib.contextmanager
def reference_checker(
    uploads: UploadsSettings, pg: PostgresSettings | None
) -> Iterator[ReferenceChecker | None]:
    """A :class:`ReferenceChecker` on its own read-only connection, or None when no query is set.

    Raises:
        ReferenceCheckFailed: the database cannot be reached.
    """
    if not uploads.reference_query:
        yield None
        return
    if pg is None:
        raise ReferenceCheckFailed("uploads.reference_query is set but no PostgreSQL settings were given")
    try:
        conn = postgres.connect(pg, application_name="swagger2mcp-ops-uploads")
        # A query that writes (a data-modifying CTE) must fail rather than change the application's data.
        conn.execute("SET default_transaction_read_only = on")
    except psycopg.Error as exc:
        raise ReferenceCheckFailed(
            f"cannot reach the application's database ({postgres.safe_error(exc, pg)}); nothing was"
            " removed. Check postgres.dsn, or unset uploads.reference_query to skip the check"
        ) from None
    prefix = uploads.reference_prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    with conn:
        yield ReferenceChecker(conn, uploads.reference_query, prefix, pg)


def _batches(entries: Iterable[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    batch: list[FileEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def select_unreferenced(
    candidates: Iterable[FileEntry],
    stats: ScanStats,
    references: ReferenceChecker,
    *,
    batch_size: int = REFERENCE_BATCH,
) -> Iterator[FileEntry]:
    """Drop the files the database references (one query per batch), counting them; yield the rest."""
    batch: list[FileEntry] = []
    for entry in candidates:
        batch.append(entry)
        if len(batch) >= batch_size:
            yield from _unreferenced(batch, references, stats)
            batch = []
    if batch:
        yield from _unreferenced(batch, references, stats)


def _unreferenced(
    batch: list[FileEntry], references: ReferenceChecker, stats: ScanStats
) -> Iterator[FileEntry]:
    referenced = references.referenced(e.rel for e in batch)
    for entry in batch:
        if entry.rel in referenced:
            stats.referenced += 1
            stats.referenced_bytes += entry.size
        else:
            yield entry
