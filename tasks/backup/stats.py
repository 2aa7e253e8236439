"""Per-table row counts and content hashes, and the comparison of a database with a manifest."""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from tasks.backup.database import _connect, _pg_error
from tasks.backup.errors import BackupError
from tasks.backup.manifest import BackupManifest, TableStats
from tasks.settings import OpsSettings

# Content hash algorithms, as recorded in manifests; a backup is verified with the one it recorded.
HASH_ROW_TEXT = "sum(hashtextextended(row::text, 0)) over rows, UTC/ISO session"
HASH_TYPED_COLUMNS = (
    "typed-columns-v2: sum over rows of hashint8extended(xor of per-column hashes seeded by position,"
    " 0); exact built-in types by their own hash function, every other type by its text output;"
    " UTC/ISO session"
)
CONTENT_HASH_ALGORITHM = HASH_TYPED_COLUMNS
CONTENT_HASH_ALGORITHMS = (HASH_TYPED_COLUMNS, HASH_ROW_TEXT)


# Session settings that make row text (and so the content hash) independent of the client's locale.
_STATS_SESSION = (
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';"
    " SET extra_float_digits = 3; SET bytea_output = 'hex'"
)


@dataclass(frozen=True)
class TableDifference:
    """One table whose rows or content differ between a database and a manifest."""

    table: str
    expected_rows: int | None
    actual_rows: int | None
    expected_hash: str | None = None
    actual_hash: str | None = None

    @property
    def reason(self) -> str:
        if self.expected_rows is None:
            return "not in the backup"
        if self.actual_rows is None:
            return "missing from the database"
        if self.expected_rows != self.actual_rows:
            return f"{self.actual_rows} rows, backup has {self.expected_rows}"
        return "content hash differs"


@dataclass(frozen=True)
class TableComparison:
    """A database compared with a manifest, table by table."""

    database: str
    backup_id: str
    tables_compared: int
    rows_compared: int
    hashes_compared: int
    differences: list[TableDifference] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        if self.matches:
            return (
                f"{self.database} matches backup {self.backup_id}: {self.tables_compared} tables,"
                f" {self.rows_compared} rows, {self.hashes_compared} content hashes equal"
            )
        shown = "; ".join(f"{d.table}: {d.reason}" for d in self.differences[:10])
        more = f" (+{len(self.differences) - 10} more)" if len(self.differences) > 10 else ""
        return f"{self.database} differs from backup {self.backup_id}: {shown}{more}"


def _user_tables(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """Ordinary tables pg_dump dumps data for: no system schemas, temp tables or extension members."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'r' AND c.relpersistence <> 't'"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'"
        " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
        "   AND d.objid = c.oid AND d.deptype = 'e')"
        " ORDER BY 1, 2"
    ).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def table_stats(
    conn: psycopg.Connection, *, algorithm: str | None, schemas: Collection[str] | None = None
) -> dict[str, TableStats]:
    """Per-table row counts (and content hashes) as the connection's current snapshot sees them
    (of the tables in ``schemas`` only, when given).

    A content hash is the sum of a 64-bit hash of each row: independent of row order (no sort of large
    tables), equal for equal multisets of rows, computed with fixed session settings so time zone or
    date style do not change it. ``algorithm`` is one of ``CONTENT_HASH_ALGORITHMS`` (None: counts only).
    """
    conn.execute(_STATS_SESSION)
    return {
        f"{schema}.{table}": _one_table_stats(conn, schema, table, algorithm=algorithm)
        for schema, table in _user_tables(conn)
        if schemas is None or schema in schemas
    }


def hash_algorithm(manifest: BackupManifest) -> str | None:
    """The content hash algorithm to verify ``manifest`` with (None: it recorded counts only).

    Raises:
        BackupError: the manifest records an algorithm this version does not know.
    """
    if not any(t.content_hash is not None for t in manifest.tables.values()):
        return None
    algorithm = manifest.content_hash_algorithm or HASH_ROW_TEXT
    if algorithm not in CONTENT_HASH_ALGORITHMS:
        raise BackupError(
            f"backup {manifest.id} records content hashes made with {algorithm!r}, which this version"
            " cannot compute; verify it with a version that knows it, or at level 'catalog'"
        )
    return algorithm


# Built-in types whose own extended hash function tells apart exactly the values whose text output
# differs (so hashing them directly proves as much as hashing their text, for a fraction of the cost).
# Numeric (1.0 = 1.00), floats (0 = -0), jsonb, interval, enums (hashed by OID) and the rest go by text.
_TYPED_HASHES: dict[int, str] = {
    21: "hashint2extended({col}, {seed})",  # int2
    23: "hashint4extended({col}, {seed})",  # int4
    20: "hashint8extended({col}, {seed})",  # int8
    26: "hashoidextended({col}, {seed})",  # oid
    19: "hashnameextended({col}, {seed})",  # name
    25: 'hashtextextended({col} COLLATE "C", {seed})',  # text: bytes, whatever the column's collation
    1043: 'hashtextextended({col} COLLATE "C", {seed})',  # varchar
    2950: "uuid_hash_extended({col}, {seed})",  # uuid
    1114: "timestamp_hash_extended({col}, {seed})",  # timestamp
    1184: "timestamp_hash_extended({col}::timestamp, {seed})",  # timestamptz: the session is UTC
}
_BPCHAR = 1042


def _row_hash_expression(conn: psycopg.Connection, schema: str, table: str) -> sql.Composable:
    """The typed-columns row hash of ``schema.table`` (see ``HASH_TYPED_COLUMNS``).

    Seeds are column positions among the live columns (a restored table has no dropped columns, so
    attnum may differ); a NULL hashes as its seed.
    """
    columns = conn.execute(
        "SELECT a.attname, a.atttypid::int, a.atttypmod FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    parts: list[sql.Composable] = []
    for seed, (name, type_oid, typmod) in enumerate(columns, start=1):
        template = _TYPED_HASHES.get(int(type_oid))
        if template is None and int(type_oid) == _BPCHAR and int(typmod) > 0:
            # char(n) is stored padded to n, so equal values are equal bytes.
            template = 'hashbpcharextended({col} COLLATE "C", {seed})'
        if template is None:
            template = "hashtextextended({col}::text, {seed})"
        hashed = sql.SQL(template).format(col=sql.Identifier(str(name)), seed=sql.Literal(seed))
        parts.append(sql.SQL("coalesce({}, {})").format(hashed, sql.Literal(seed)))
    combined = sql.SQL(" # ").join(parts) if parts else sql.SQL("0")
    return sql.SQL("hashint8extended({}, 0)").format(combined)


def _one_table_stats(
    conn: psycopg.Connection, schema: str, table: str, *, algorithm: str | None
) -> TableStats:
    """One table's row count (and content hash) in one scan; the session must have ``_STATS_SESSION``."""
    ident = sql.Identifier(schema, table)
    if algorithm is None:
        row = conn.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(ident)).fetchone()
        assert row is not None
        return TableStats(rows=int(row[0]))
    if algorithm == HASH_ROW_TEXT:
        row_hash: sql.Composable = sql.SQL("hashtextextended(t::text, 0)")
    else:
        row_hash = _row_hash_expression(conn, schema, table)
    query = sql.SQL("SELECT count(*), coalesce(sum({}), 0) FROM ONLY {} AS t").format(row_hash, ident)
    row = conn.execute(query).fetchone()
    assert row is not None
    return TableStats(rows=int(row[0]), content_hash=str(row[1]))


class _RestoredTableStats:
    """Counts (and hashes) the tables of a database being restored, each as soon as its rows are in.

    Tables are read on up to ``backup.restore_jobs`` connections, one statement per table: in a copy
    only the restore writes to, a table whose data is committed no longer changes, so this sees exactly
    what one snapshot after the restore would. While data is still loading only one connection reads
    (the load needs the rest of the machine); ``finish`` then reads every remaining table, the largest
    first, at the same time as the index builds. A table is locked only while it is read.
    """

    def __init__(self, settings: OpsSettings, database: str, manifest: BackupManifest) -> None:
        self._settings = settings
        self._database = database
        self._expected = manifest.tables
        self._algorithm = hash_algorithm(manifest)
        self._jobs = max(1, settings.backup.restore_jobs)
        self._cond = threading.Condition()
        self._pending: list[tuple[str, str]] = []
        self._queued: set[str] = set()
        self._closed = False
        self._permits = 1
        self._running = 0
        self.results: dict[str, TableStats] = {}
        self._errors: list[BaseException] = []
        self._workers: list[threading.Thread] = []

    def _start_workers(self, count: int) -> None:
        while len(self._workers) < count:
            worker = threading.Thread(
                target=self._work, name=f"compare-{self._database}-{len(self._workers)}", daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def table_loaded(self, name: str) -> None:
        """``name`` (``schema.table``, as in the manifest) has all its rows committed."""
        if name.count(".") != 1:
            return  # ambiguous as printed (a dot in a name): read in finish() instead
        schema, _, table = name.partition(".")
        with self._cond:
            if name in self._queued or self._closed or name not in self._expected:
                return
            self._queued.add(name)
            self._pending.append((schema, table))
            self._cond.notify_all()
        self._start_workers(1)

    def finish(self) -> dict[str, TableStats]:
        """All data is loaded: read every table not read yet, on all connections; return the stats."""
        with _connect(self._settings, self._database, purpose="backup-compare") as conn:
            tables = _user_tables(conn)
        rest = [(s, t) for s, t in tables if f"{s}.{t}" not in self._queued]
        rest.sort(key=lambda t: -self._rows(f"{t[0]}.{t[1]}"))
        with self._cond:
            self._pending.extend(rest)
            self._queued.update(f"{s}.{t}" for s, t in rest)
            self._closed = True
            self._permits = self._jobs
            self._cond.notify_all()
        self._start_workers(min(self._jobs, max(1, len(self._queued))))
        self.join()
        if self._errors:
            exc = self._errors[0]
            if isinstance(exc, BackupError):
                raise exc
            raise BackupError(
                f"counting rows in {self._database!r} failed: {_pg_error(exc, self._settings)}"
            ) from None
        return {name: self.results[name] for name in sorted(self.results)}

    def stop(self) -> None:
        """Stop taking tables (the restore failed); running statements end when the database is dropped."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()

    def join(self) -> None:
        for worker in self._workers:
            worker.join()

    def _rows(self, name: str) -> int:
        found = self._expected.get(name)
        return found.rows if found is not None else 0

    def _work(self) -> None:
        try:
            with _connect(self._settings, self._database, purpose="backup-compare") as conn:
                conn.autocommit = True
                conn.execute(
                    f"SET statement_timeout = {int(self._settings.backup.restore_timeout_seconds * 1000)}"
                )
                conn.execute(_STATS_SESSION)
                while True:
                    with self._cond:
                        while not self._errors and not (
                            (self._pending and self._running < self._permits)
                            or (self._closed and not self._pending)
                        ):
                            self._cond.wait()
                        if self._errors or not self._pending:
                            return
                        schema, table = self._pending.pop(0)
                        self._running += 1
                    try:
                        stats = _one_table_stats(conn, schema, table, algorithm=self._algorithm)
                    finally:
                        with self._cond:
                            self._running -= 1
                            self._cond.notify_all()
                    with self._cond:
                        self.results[f"{schema}.{table}"] = stats
        except BaseException as exc:  # re-raised by finish() on the calling thread
            with self._cond:
                self._errors.append(exc)
                self._cond.notify_all()


def compare_stats(
    expected: dict[str, TableStats], actual: dict[str, TableStats], *, database: str, backup_id: str
) -> TableComparison:
    """Compare per-table counts and (where both have one) content hashes."""
    differences = []
    hashes = 0
    for name in sorted(set(expected) | set(actual)):
        want, got = expected.get(name), actual.get(name)
        if want is None or got is None:
            differences.append(TableDifference(name, want.rows if want else None, got.rows if got else None))
            continue
        if want.content_hash is not None and got.content_hash is not None:
            hashes += 1
        if want.rows != got.rows or (
            want.content_hash is not None
            and got.content_hash is not None
            and want.content_hash != got.content_hash
        ):
            differences.append(
                TableDifference(name, want.rows, got.rows, want.content_hash, got.content_hash)
            )
    return TableComparison(
        database=database,
        backup_id=backup_id,
        tables_compared=len(set(expected) & set(actual)),
        rows_compared=sum(s.rows for n, s in actual.items() if n in expected),
        hashes_compared=hashes,
        differences=differences,
    )


def compare_database_to_manifest(
    settings: OpsSettings, manifest: BackupManifest, database: str
) -> TableComparison:
    """Count (and hash, when the manifest has hashes) every table of ``database`` and compare.

    Raises:
        BackupError: the database cannot be reached.
    """
    algorithm = hash_algorithm(manifest)
    timeout_ms = int(settings.backup.restore_timeout_seconds * 1000)
    with _connect(settings, database, purpose="backup-compare") as conn:
        conn.execute(f"SET statement_timeout = {timeout_ms}")
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            actual = table_stats(conn, algorithm=algorithm)
    return compare_stats(manifest.tables, actual, database=database, backup_id=manifest.id)


def _database_stats(settings: OpsSettings, database: str) -> dict[str, TableStats]:
    """Counts and content hashes of every table of ``database`` in one read-only snapshot."""
    timeout_ms = int(settings.backup.restore_timeout_seconds * 1000)
    with _connect(settings, database, purpose="backup-compare") as conn:
        conn.execute(f"SET statement_timeout = {timeout_ms}")
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return table_stats(conn, algorithm=CONTENT_HASH_ALGORITHM)
