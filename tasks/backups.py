"""PostgreSQL backups: streamed, checksummed dumps with a data-level manifest, verification, restore and
retention.

A backup is ``pg_dump -Fc -Z0`` streamed through in-process zstd and sha256 straight into the storage
backend (no full-size temporary file). The per-table row counts and content hashes are computed in the
same snapshot the dump reads (``pg_export_snapshot()`` in a REPEATABLE READ transaction that stays open
while ``pg_dump --snapshot`` runs), so a restored copy can be compared with the manifest row for row.
The manifest is written last: a backup without one is unfinished and never listed.

Storage layout under the storage URL::

    manifests/<id>.json      the manifest (written last, re-written when a verification is recorded)
    data/<id>.dump.zst       the zstd-compressed custom-format dump

Plain functions first; Prefect task wrappers at the bottom.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import psycopg
import zstandard
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from psycopg import sql
from pydantic import BaseModel, Field, ValidationError

from tasks import locks, postgres
from tasks.commands import StreamingCommand, run_command, stream_command
from tasks.errors import CheckFailed, CommandError, OpsError, ParameterError
from tasks.reports import Progress
from tasks.runlog import run_logger
from tasks.secrets import mask_text, mask_url
from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, Storage, UnfinishedObject, open_storage, update_object

VerifyLevel = Literal["checksum", "catalog", "restore"]
VERIFY_RANK: dict[str, int] = {"checksum": 1, "catalog": 2, "restore": 3}
COMPRESSION = "zstd"
FORMAT = "pg_dump-custom"
# Content hash algorithms, as recorded in manifests; a backup is verified with the one it recorded.
HASH_ROW_TEXT = "sum(hashtextextended(row::text, 0)) over rows, UTC/ISO session"
HASH_TYPED_COLUMNS = (
    "typed-columns-v2: sum over rows of hashint8extended(xor of per-column hashes seeded by position,"
    " 0); exact built-in types by their own hash function, every other type by its text output;"
    " UTC/ISO session"
)
CONTENT_HASH_ALGORITHM = HASH_TYPED_COLUMNS
CONTENT_HASH_ALGORITHMS = (HASH_TYPED_COLUMNS, HASH_ROW_TEXT)
MANIFEST_DIR = "manifests"
DATA_DIR = "data"
_PIPE_CHUNK = 1 << 20
# How much of the start of an archive is kept for a parallel post-data restore (the catalog sits there).
_CATALOG_LIMIT = 64 * 1024 * 1024
_IDENT_SAFE = re.compile(r"[^a-zA-Z0-9_]+")
# Session settings that make row text (and so the content hash) independent of the client's locale.
_STATS_SESSION = (
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';"
    " SET extra_float_digits = 3; SET bytea_output = 'hex'"
)


# --- errors ---------------------------------------------------------------------------------------


class BackupError(OpsError):
    """A backup, verification, restore or prune could not be done."""


class BackupNotFound(BackupError):
    """No backup matches the id (or no backup exists yet)."""


class BackupNotVerified(BackupError):
    """No backup has passed the verification level asked for."""


class ManifestUnreadable(BackupError):
    """A manifest exists but does not parse (cut short, or written by a newer version)."""


class BackupCorrupt(CheckFailed):
    """The stored object does not match its manifest (size or sha256), or does not restore."""


class DatabaseNotFound(BackupError):
    """The database to back up or restore into does not exist."""


class RestoreFailed(BackupError):
    """The restore did not complete; the target database was left as it was."""


# --- the manifest ---------------------------------------------------------------------------------


class TableStats(BaseModel):
    """Rows of one table (and its content hash when recorded) in the dump's snapshot."""

    rows: int
    content_hash: str | None = None
    bytes: int | None = Field(default=None, description="the table's size on disk when backed up")


class Verification(BaseModel):
    """One verification of a backup: level, result, time and what was found."""

    level: VerifyLevel
    ok: bool
    at: datetime
    detail: str
    duration_seconds: float | None = None


class BackupManifest(BaseModel):
    """Everything known about one backup; stored as JSON beside the dump and written last."""

    id: str
    database: str
    stack: str = ""
    source: str = Field(default="", description="the server the dump came from, password masked")
    started_at: datetime
    finished_at: datetime
    size_bytes: int = Field(description="size of the stored (compressed) object")
    raw_size_bytes: int = Field(default=0, description="size of the dump before compression")
    sha256: str = Field(description="sha256 of the stored object")
    compression: str = COMPRESSION
    format: str = FORMAT
    data_key: str = ""
    pg_dump_version: str
    server_version: str
    snapshot: str = ""
    content_hash_algorithm: str | None = None
    tables: dict[str, TableStats] = Field(default_factory=dict)
    verifications: list[Verification] = Field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def verified(self, level: VerifyLevel = "restore") -> bool:
        """Whether the newest verification at ``level`` or stronger passed."""
        wanted = VERIFY_RANK[level]
        relevant = [v for v in self.verifications if VERIFY_RANK[v.level] >= wanted]
        return bool(relevant) and max(relevant, key=lambda v: v.at).ok

    @property
    def strongest_verified(self) -> str | None:
        for level in ("restore", "catalog", "checksum"):
            if self.verified(level):  # type: ignore[arg-type]
                return level
        return None


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


@dataclass(frozen=True)
class ConnectionInfo:
    """A session connected to a database a restore would replace."""

    pid: int
    user: str
    application: str
    client: str
    state: str


@dataclass(frozen=True)
class RestorePreflight:
    """What a restore would do, computed without touching anything."""

    backup_id: str
    backup_finished_at: datetime
    backup_size_bytes: int
    backup_rows: int
    backup_verified: str | None
    target_database: str
    target_exists: bool
    target_size_bytes: int | None
    connections: list[ConnectionInfo]
    scratch_database: str
    old_database: str | None
    keep_old: bool

    def steps(self) -> list[str]:
        steps = [
            f"re-read backup {self.backup_id} and check its sha256 ({self.backup_size_bytes} bytes)",
            f"restore it into a new database {self.scratch_database}",
            f"compare {self.scratch_database} with the manifest ({self.backup_rows} rows)",
        ]
        if self.target_exists:
            steps.append(
                f"block new connections to {self.target_database} and end its {len(self.connections)}"
                " sessions"
            )
            steps.append(
                f"rename {self.target_database} -> {self.old_database} and {self.scratch_database} ->"
                f" {self.target_database} in one transaction"
            )
            steps.append(
                f"keep {self.old_database} (read-only by default) and list its tables whose rows changed"
                " since the backup"
                if self.keep_old
                else f"drop {self.old_database} (the old database)"
            )
        else:
            steps.append(f"rename {self.scratch_database} -> {self.target_database}")
        return steps


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did; ``comparison`` is the evidence that the data equals the manifest."""

    backup_id: str
    target_database: str
    scratch_database: str
    old_database: str | None
    old_kept: bool
    terminated_connections: int
    comparison: TableComparison
    commands: list[str]
    duration_seconds: float
    # The kept database compared with the backup: its tables whose rows changed since the backup's
    # snapshot (the writes a restore took out of service), or why the compare could not run.
    kept_changes: TableComparison | None = None
    kept_compare_error: str | None = None
    kept_open_command: str = ""

    @property
    def kept_changed_tables(self) -> list[str]:
        """Tables of the kept database whose rows differ from the backup (empty when none kept)."""
        return [d.table for d in self.kept_changes.differences] if self.kept_changes else []

    def kept_lines(self) -> list[str]:
        """What an operator is told about the kept database: its name, how to open it, what changed."""
        if not self.old_database or not self.old_kept:
            return []
        lines = [
            f"The replaced database is kept as `{self.old_database}` (read-only by default; nothing was"
            f" dropped). Open it: `{self.kept_open_command}`"
        ]
        if self.kept_changes is not None:
            if self.kept_changes.matches:
                lines.append(f"It holds no row that differs from backup {self.backup_id}.")
            else:
                lines.append(
                    f"Tables whose rows changed since backup {self.backup_id} (these changes are only in"
                    f" `{self.old_database}`):"
                )
                lines += [
                    f"- `{d.table}`: {d.actual_rows if d.actual_rows is not None else 'absent'} rows there,"
                    f" {d.expected_rows if d.expected_rows is not None else 'absent'} in the backup"
                    + ("" if d.expected_rows != d.actual_rows else " (content differs)")
                    for d in self.kept_changes.differences
                ]
        elif self.kept_compare_error:
            lines.append(f"It could not be compared with the backup: {self.kept_compare_error}")
        return lines


@dataclass(frozen=True)
class RetentionDecision:
    """Keep or delete one backup, and why."""

    backup_id: str
    database: str
    finished_at: datetime
    keep: bool
    reasons: list[str]


@dataclass(frozen=True)
class UnreadableManifest:
    """A backup whose manifest exists but does not parse: its state is unknown, so it is never deleted."""

    backup_id: str
    key: str
    error: str
    database: str | None = None


@dataclass(frozen=True)
class RetentionPlan:
    """What a prune would delete: backups outside every tier, and unfinished objects past the grace.

    ``unknown`` lists backups whose manifest could not be read: kept, and reported for a person to look.
    """

    decisions: list[RetentionDecision]
    unfinished: list[UnfinishedObject] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    unknown: list[UnreadableManifest] = field(default_factory=list)

    @property
    def to_delete(self) -> list[RetentionDecision]:
        return [d for d in self.decisions if not d.keep]

    @property
    def to_keep(self) -> list[RetentionDecision]:
        return [d for d in self.decisions if d.keep]


@dataclass(frozen=True)
class PruneResult:
    """The change record of a prune: what was (or, on a dry run, would be) deleted."""

    dry_run: bool
    plan: RetentionPlan
    deleted_backups: list[str]
    deleted_objects: list[str]
    discarded_unfinished: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.deleted_backups or self.deleted_objects or self.discarded_unfinished)


# --- naming and storage keys ----------------------------------------------------------------------


def manifest_key(backup_id: str) -> str:
    return f"{MANIFEST_DIR}/{backup_id}.json"


def data_key(backup_id: str) -> str:
    return f"{DATA_DIR}/{backup_id}.dump.zst"


def new_backup_id(database: str, at: datetime) -> str:
    """``<UTC timestamp>-<database>-<random>``: sorts by time, names the database, never collides."""
    safe = _IDENT_SAFE.sub("-", database).strip("-")[:40] or "db"
    return f"{at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{safe}-{secrets.token_hex(3)}"


def _valid_backup_id(backup_id: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}", backup_id))


def database_lock_name(database: str) -> str:
    """The advisory lock a restore of ``database`` holds, and a migration of it for its whole run."""
    return f"swagger2mcp-ops:database:{database}"


def scratch_name(base: str, purpose: str) -> str:
    """A new database name ``<base>__<purpose>_<random>`` within PostgreSQL's 63-byte limit."""
    suffix = f"__{purpose}_{secrets.token_hex(4)}"
    return base[: 63 - len(suffix)] + suffix


def _settings_database(settings: OpsSettings) -> str:
    return postgres.database_name(settings.postgres.dsn.get_secret_value())


def _storage(settings: OpsSettings) -> Storage:
    return open_storage(settings.storage, attempts=settings.backup.upload_attempts)


# --- libpq for the command-line tools -------------------------------------------------------------


def _tool_connection(settings: OpsSettings, database: str) -> tuple[str, dict[str, str], list[str]]:
    """The ``--dbname`` URL without the password, the environment carrying it, and the secrets to mask."""
    raw = postgres.libpq_dsn(settings.postgres.dsn.get_secret_value(), database=database)
    parts = urlsplit(raw)
    env = {"PGCONNECT_TIMEOUT": str(max(1, round(settings.postgres.connect_timeout_seconds)))}
    secret_values: list[str] = []
    netloc = parts.netloc
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        secret_values += [parts.password, env["PGPASSWORD"]]
        netloc = netloc.replace(f":{parts.password}@", "@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), env, secret_values


def _pg_error(exc: BaseException, settings: OpsSettings) -> str:
    return postgres.safe_error(exc, settings.postgres)


def _connect(settings: OpsSettings, database: str, *, purpose: str) -> psycopg.Connection:
    try:
        return postgres.connect(
            settings.postgres, database=database, application_name=f"swagger2mcp-ops-{purpose}"
        )
    except psycopg.Error as exc:
        raise BackupError(
            f"cannot connect to database {database!r} on {_server(settings)}: {_pg_error(exc, settings)};"
            " check OPS_POSTGRES__DSN (user, password, host) and that the server runs"
        ) from None


def _server(settings: OpsSettings) -> str:
    parts = urlsplit(mask_url(settings.postgres.dsn.get_secret_value()))
    return parts.netloc


def _maintenance(settings: OpsSettings) -> psycopg.Connection:
    return _connect(settings, settings.backup.maintenance_database, purpose="backup-admin")


def database_exists(settings: OpsSettings, database: str) -> bool:
    """Whether ``database`` exists on the server (asked through the maintenance database)."""
    with _maintenance(settings) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is not None
        )


def _require_database(settings: OpsSettings, database: str) -> None:
    if not database_exists(settings, database):
        raise DatabaseNotFound(
            f"database {database!r} does not exist on {_server(settings)}; nothing was done. Check the name"
            " (parameter or OPS_POSTGRES__DSN)"
        )


def _tool_version(settings: OpsSettings, tool: str) -> str:
    result = run_command([tool, "--version"], timeout=30)
    return result.stdout.strip()


# --- table statistics (counts and content hashes) -------------------------------------------------


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


def table_stats(conn: psycopg.Connection, *, algorithm: str | None) -> dict[str, TableStats]:
    """Per-table row counts (and content hashes) as the connection's current snapshot sees them.

    A content hash is the sum of a 64-bit hash of each row: independent of row order (no sort of large
    tables), equal for equal multisets of rows, computed with fixed session settings so time zone or
    date style do not change it. ``algorithm`` is one of ``CONTENT_HASH_ALGORITHMS`` (None: counts only).
    """
    conn.execute(_STATS_SESSION)
    return {
        f"{schema}.{table}": _one_table_stats(conn, schema, table, algorithm=algorithm)
        for schema, table in _user_tables(conn)
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


# --- streaming ------------------------------------------------------------------------------------


class _HashingWriter:
    """Counts and hashes what passes to the storage writer."""

    def __init__(self, target: IO[bytes] | object) -> None:
        self._target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self._target.write(data)  # type: ignore[attr-defined]
        return len(data)

    def flush(self) -> None:
        return None


def _verified_chunks(
    storage: Storage, manifest: BackupManifest, *, final_check: bool = True
) -> Iterator[bytes]:
    """The stored object's bytes; after the last chunk its size and sha256 are checked."""
    sha = hashlib.sha256()
    size = 0
    try:
        for chunk in storage.iter_chunks(manifest.data_key or data_key(manifest.id)):
            sha.update(chunk)
            size += len(chunk)
            yield chunk
    except ObjectNotFound:
        raise BackupCorrupt(
            f"backup {manifest.id}: its data object is missing from the storage; it cannot be restored."
            " Use another backup"
        ) from None
    if final_check:
        _check_digest(manifest, size, sha.hexdigest())


def _check_digest(manifest: BackupManifest, size: int, digest: str) -> None:
    if size != manifest.size_bytes:
        raise BackupCorrupt(
            f"backup {manifest.id} is truncated or altered: {size} bytes stored, the manifest says"
            f" {manifest.size_bytes}. Nothing was restored; use another backup"
        )
    if digest != manifest.sha256:
        raise BackupCorrupt(
            f"backup {manifest.id} is corrupted: sha256 {digest[:16]}... does not match the manifest's"
            f" {manifest.sha256[:16]}.... Nothing was restored; use another backup"
        )


def _decompressed(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """zstd-decompress a stream of chunks without holding it whole."""
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    for chunk in chunks:
        out = decompressor.decompress(chunk)
        if out:
            yield out
    if not decompressor.eof:
        raise BackupCorrupt("the backup's zstd stream ends early (truncated object)")


# --- create ---------------------------------------------------------------------------------------


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
    pg_dump_version = _tool_version(settings, cfg.pg_dump)
    dbname, env, secret_values = _tool_connection(settings, database)
    env["PGAPPNAME"] = "swagger2mcp-ops-pg_dump"
    compressor = zstandard.ZstdCompressor(level=cfg.zstd_level, threads=cfg.zstd_threads)
    progress = Progress(f"backup-{settings.stack}-progress", f"Dump of {database}")

    with _connect(settings, database, purpose="backup-snapshot") as snap:
        snap.execute(f"SET statement_timeout = {int(cfg.dump_timeout_seconds * 1000)}")
        snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # The counts and hashes run beside pg_dump: parallel workers would only take its CPU.
        snap.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        row = snap.execute(
            "SELECT pg_export_snapshot(), current_setting('server_version'),"
            " pg_database_size(current_database())"
        ).fetchone()
        assert row is not None
        snapshot, server_version, db_size = str(row[0]), str(row[1]), int(row[2])
        logger.info(
            "backup %s of %s: snapshot %s, database size %s bytes", backup_id, database, snapshot, db_size
        )
        argv = [
            cfg.pg_dump,
            "--format=custom",
            "--compress=0",
            f"--snapshot={snapshot}",
            "--no-password",
            f"--dbname={dbname}",
        ]
        stats_box: dict[str, object] = {}

        def _collect_stats() -> None:
            # Same connection, same transaction: the exported snapshot's view of every table.
            try:
                tables = table_stats(snap, algorithm=CONTENT_HASH_ALGORITHM if content_hashes else None)
                # Sizes guide how a restore splits the data between its streams.
                for name, size in snap.execute(
                    "SELECT n.nspname || '.' || c.relname, pg_table_size(c.oid) FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r'"
                ).fetchall():
                    if str(name) in tables:
                        tables[str(name)].bytes = int(size)
                stats_box["tables"] = tables
            except BaseException as exc:  # re-raised on the calling thread
                stats_box["error"] = exc

        stats_thread = threading.Thread(target=_collect_stats, name=f"stats-{backup_id}", daemon=True)
        raw_size = 0
        try:
            with storage.open_write(key) as writer:
                sink = _HashingWriter(writer)
                with stream_command(
                    argv, timeout=cfg.dump_timeout_seconds, env=env, secrets=secret_values
                ) as cmd:
                    stats_thread.start()
                    with compressor.stream_writer(sink, closefd=False) as zwriter:  # type: ignore[arg-type]
                        while chunk := cmd.pipe.read(_PIPE_CHUNK):
                            zwriter.write(chunk)
                            raw_size += len(chunk)
                            # The database size (indexes included) over-estimates the dump: a rough bar.
                            progress.update(min(99.0, raw_size * 100 / max(db_size, 1)))
                            if on_progress is not None:
                                on_progress(raw_size, db_size)
                stats_thread.join()
                if "error" in stats_box:
                    # Raised inside the write: the unfinished object is removed, no manifest is written.
                    raise BackupError(
                        "counting rows in the dump's snapshot failed:"
                        f" {_pg_error(stats_box['error'], settings)}"  # type: ignore[arg-type]
                    )
        except BaseException:
            # Stop the counting query before the connection closes under it.
            if stats_thread.is_alive():
                with contextlib.suppress(psycopg.Error):
                    snap.cancel_safe(timeout=5)
                stats_thread.join(timeout=10)
            raise
        with contextlib.suppress(psycopg.Error):
            snap.execute("COMMIT")
    finished = datetime.now(UTC)
    tables: dict[str, TableStats] = stats_box["tables"]  # type: ignore[assignment]
    manifest = BackupManifest(
        id=backup_id,
        database=database,
        stack=settings.stack,
        source=_server(settings),
        started_at=started,
        finished_at=finished,
        size_bytes=sink.size,
        raw_size_bytes=raw_size,
        sha256=sink.sha.hexdigest(),
        data_key=key,
        pg_dump_version=pg_dump_version,
        server_version=server_version,
        snapshot=snapshot,
        content_hash_algorithm=CONTENT_HASH_ALGORITHM if content_hashes else None,
        tables=tables,
    )
    write_manifest(storage, manifest)
    progress.update(100.0)
    logger.info(
        "backup %s written: %s bytes (raw %s), %s tables, %s rows, %.1fs",
        backup_id,
        manifest.size_bytes,
        raw_size,
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


def write_manifest(storage: Storage, manifest: BackupManifest) -> None:
    storage.put_bytes(manifest_key(manifest.id), manifest.model_dump_json(indent=2).encode())


def _parse_error(exc: ValueError) -> str:
    """A short, one-line reason a manifest does not parse (which field, what was found)."""
    if not isinstance(exc, ValidationError):
        return str(exc).splitlines()[0]
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "document"
        found = error.get("input")
        shown = f" (found {found!r})" if isinstance(found, str | int | float) and len(str(found)) < 80 else ""
        parts.append(f"{where}: {error['msg']}{shown}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


def parse_manifest(raw: bytes, key: str) -> BackupManifest:
    """Parse a stored manifest.

    Raises:
        ManifestUnreadable: the bytes are not a manifest this version understands.
    """
    try:
        return BackupManifest.model_validate_json(raw)
    except ValueError as exc:
        raise ManifestUnreadable(
            f"manifest {key} is unreadable: {_parse_error(exc)}. It may be cut short or written by a newer"
            " version; its backup is kept and not used until the manifest is repaired"
        ) from None


def read_manifest(storage: Storage, backup_id: str) -> BackupManifest:
    """The manifest of ``backup_id``.

    Raises:
        BackupNotFound: no such (finished) backup.
        ManifestUnreadable: the manifest exists but does not parse.
    """
    if not _valid_backup_id(backup_id):
        raise BackupNotFound(f"{backup_id!r} is not a backup id; list backups with the verify-backup flow")
    key = manifest_key(backup_id)
    try:
        return parse_manifest(storage.get_bytes(key), key)
    except ObjectNotFound:
        raise BackupNotFound(
            f"no backup {backup_id!r} in {storage.location}; nothing was done. Pass an existing id,"
            " 'latest' or 'latest-verified'"
        ) from None


# --- listing and resolving ------------------------------------------------------------------------


def _named_database(raw: bytes) -> str | None:
    """The database an unreadable manifest names, when its JSON is intact enough to say."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    name = doc.get("database") if isinstance(doc, dict) else None
    return name if isinstance(name, str) else None


def scan_backups(
    storage: Storage, database: str | None = None
) -> tuple[list[BackupManifest], list[UnreadableManifest]]:
    """Every manifest, read: the finished backups (newest first) and those whose manifest does not parse.

    An unreadable manifest whose database cannot be told is listed whatever ``database`` is.
    """
    manifests: list[BackupManifest] = []
    unreadable: list[UnreadableManifest] = []
    for item in storage.list(MANIFEST_DIR):
        if not item.key.endswith(".json"):
            continue
        try:
            raw = storage.get_bytes(item.key)
        except ObjectNotFound:  # deleted since the listing: the backup is gone
            continue
        try:
            manifest = parse_manifest(raw, item.key)
        except ManifestUnreadable as exc:
            named = _named_database(raw)
            if database is None or named in (None, database):
                backup_id = item.key.removeprefix(f"{MANIFEST_DIR}/").removesuffix(".json")
                unreadable.append(UnreadableManifest(backup_id, item.key, str(exc), named))
            continue
        if database is None or manifest.database == database:
            manifests.append(manifest)
    manifests.sort(key=lambda m: (m.finished_at, m.id), reverse=True)
    return manifests, unreadable


def list_backups(settings: OpsSettings, database: str | None = None) -> list[BackupManifest]:
    """Finished backups (those with a readable manifest), newest first; all databases when ``database``
    is None. Unreadable manifests are logged as warnings (``prune-backups`` reports them)."""
    manifests, unreadable = scan_backups(_storage(settings), database)
    for item in unreadable:
        run_logger(__name__).warning("skipping backup %s: %s", item.backup_id, item.error)
    return manifests


def latest_verified(
    settings: OpsSettings, database: str | None = None, level: VerifyLevel = "restore"
) -> BackupManifest | None:
    """The newest backup whose newest verification at ``level`` (or stronger) passed."""
    for manifest in list_backups(settings, database):
        if manifest.verified(level):
            return manifest
    return None


def resolve_backup_id(
    settings: OpsSettings, ref: str, *, database: str | None = None, level: VerifyLevel = "restore"
) -> BackupManifest:
    """Turn ``latest``, ``latest-verified`` or an id into a manifest.

    Raises:
        BackupNotFound: unknown id, or no backup at all.
        BackupNotVerified: ``latest-verified`` and no backup passed ``level``.
    """
    ref = ref.strip()
    if ref == "latest":
        found = list_backups(settings, database)
        if not found:
            raise BackupNotFound(f"no finished backup{_of(database)} exists yet; run backup-database first")
        return found[0]
    if ref == "latest-verified":
        manifest = latest_verified(settings, database, level)
        if manifest is None:
            raise BackupNotVerified(
                f"no backup{_of(database)} has passed a {level} verification; run verify-backup on one or"
                " pass backup_id"
            )
        return manifest
    manifest = read_manifest(_storage(settings), ref)
    if database is not None and manifest.database != database:
        raise BackupNotFound(f"backup {ref} is of database {manifest.database!r}, not {database!r}")
    return manifest


def _of(database: str | None) -> str:
    return f" of {database!r}" if database else ""


# --- verification ---------------------------------------------------------------------------------


def _record(storage: Storage, backup_id: str, verification: Verification) -> None:
    """Append ``verification`` to the manifest with a conditional write, retried on a conflict, so a
    concurrent verification's entry is never lost.

    Raises:
        BackupNotFound: the backup was deleted meanwhile (nothing is written).
        ManifestUnreadable: the manifest no longer parses (nothing is written).
    """
    key = manifest_key(backup_id)

    def add(raw: bytes) -> bytes:
        manifest = parse_manifest(raw, key)
        manifest.verifications.append(verification)
        return manifest.model_dump_json(indent=2).encode()

    try:
        update_object(storage, key, add)
    except ObjectNotFound:
        raise BackupNotFound(
            f"backup {backup_id} was deleted while it was verified; its {verification.level} result"
            f" ({'ok' if verification.ok else 'failed'}) was not recorded"
        ) from None


def checksum_backup(storage: Storage, manifest: BackupManifest) -> str:
    """Re-read the stored object and check its size and sha256 against the manifest.

    Raises:
        BackupCorrupt: size or digest differ, or the object is missing.
    """
    for _ in _verified_chunks(storage, manifest):
        pass
    return f"sha256 and size ({manifest.size_bytes} bytes) match the manifest"


def _data_entry(table: str) -> str:
    """What ``pg_restore --list`` prints for the data of ``schema.table`` (names unquoted)."""
    schema, _, name = table.partition(".")
    return f" TABLE DATA {schema} {name} "


def catalog_backup(settings: OpsSettings, storage: Storage, manifest: BackupManifest) -> str:
    """Checksum the object, then list its catalog with ``pg_restore --list``.

    Raises:
        BackupCorrupt: checksum failed, the archive is unreadable, or a manifest table has no data entry.
    """
    checksum_backup(storage, manifest)
    listing = _catalog_listing(settings, storage, manifest)
    # pg_restore --list prints names unquoted: "<id>; <oid> <oid> TABLE DATA <schema> <table> <owner>".
    missing = [t for t in manifest.tables if _data_entry(t) not in listing]
    if missing:
        raise BackupCorrupt(f"backup {manifest.id}: the catalog has no data for {', '.join(missing[:10])}")
    entries = sum(1 for line in listing.splitlines() if line and not line.startswith(";"))
    return f"checksum ok; catalog lists {entries} entries, data for all {len(manifest.tables)} tables"


def _catalog_listing(settings: OpsSettings, storage: Storage, manifest: BackupManifest) -> str:
    """``pg_restore --list`` output of the archive (reads only the header and catalog)."""
    head = bytearray()
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    # The catalog sits at the start of a custom-format archive; a few MB hold it for any real schema.
    for chunk in storage.iter_chunks(manifest.data_key or data_key(manifest.id)):
        head += decompressor.decompress(chunk)
        if len(head) >= 64 * 1024 * 1024:
            break
    result = run_command(
        [settings.backup.pg_restore, "--list"],
        timeout=600,
        input=bytes(head),
        check=False,
        log_output=False,
    )
    if not result.stdout.strip():
        raise BackupCorrupt(
            f"backup {manifest.id}: pg_restore --list read no catalog: {result.stderr[-500:]}"
        )
    return result.stdout


@contextlib.contextmanager
def _scratch_database(settings: OpsSettings, name: str, *, owner: str | None) -> Iterator[str]:
    """Create an empty database for a restore; drop it afterwards (a no-op once it was renamed away)."""
    with _maintenance(settings) as conn:
        owner_sql = sql.SQL(" OWNER {}").format(sql.Identifier(owner)) if owner else sql.SQL("")
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0{}").format(sql.Identifier(name), owner_sql)
        )
    try:
        yield name
    finally:
        drop_database(settings, name)


def drop_database(settings: OpsSettings, name: str) -> None:
    """End the sessions on ``name`` and drop it (idempotent)."""
    with _maintenance(settings) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


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
    cfg = settings.backup
    dbname, env, secret_values = _tool_connection(settings, database)
    env["PGAPPNAME"] = "swagger2mcp-ops-pg_restore"
    base = [cfg.pg_restore, "--exit-on-error", "--no-password", f"--dbname={dbname}"]
    timeout = cfg.restore_timeout_seconds
    reading = _Reading(storage, manifest)
    if cfg.restore_jobs <= 1:
        with stream_command(base, timeout=timeout, mode="write", env=env, secrets=secret_values) as cmd:
            for piece in reading.pieces():
                cmd.pipe.write(piece)
            reading.check()
        assert cmd.result is not None
        if alongside_post_data is not None:
            alongside_post_data()
        return [cmd.result.command_line]
    spool_root = cfg.spool_dir or Path(tempfile.gettempdir())
    spool_root.mkdir(parents=True, exist_ok=True)
    commands = []
    watch = on_table_loaded is not None
    with tempfile.NamedTemporaryFile(dir=spool_root, prefix=f"{manifest.id}-", suffix=".catalog") as head:
        pieces = reading.pieces()
        # The head: the archive's first bytes up to _CATALOG_LIMIT, which hold its catalog (an archive
        # smaller than that is held whole). Post-data entries, and pre-data ones, carry no data: the
        # catalog is all pg_restore needs for them.
        kept, rest = 0, b""
        for piece in pieces:
            room = _CATALOG_LIMIT - kept
            head.write(piece[:room])
            kept += min(len(piece), room)
            if kept >= _CATALOG_LIMIT:
                rest = piece[room:]
                break
        head.flush()
        whole = kept < _CATALOG_LIMIT
        pre = run_command(
            [*base, "--section=pre-data", head.name],
            timeout=timeout,
            env=env,
            secrets=secret_values,
            check=False,
        )
        commands.append(pre.command_line)
        split: _DataSplit | None = None
        if pre.ok:
            listing = run_command(
                [cfg.pg_restore, "--list", head.name], timeout=timeout, env=env, secrets=secret_values
            ).stdout
            if unlogged_load:
                _make_tables_unlogged(settings, database, listing)
            if _data_streams(settings) > 1:
                split = _DataSplit.of(manifest, listing, Path(head.name))
            data_args = ["--section=data", *(["--use-list", str(split.first)] if split else [])]

            def feed() -> Iterator[bytes]:
                with open(head.name, "rb") as again:
                    while block := again.read(_PIPE_CHUNK):
                        yield block
                if rest:
                    yield rest
                yield from pieces

        elif whole:
            raise CommandError(
                f"pg_restore exited {pre.returncode}: {pre.command_line}\n{pre.stderr[-4000:]}"
            )
        else:
            # A catalog larger than the head: pre-data and data from one stream, read again.
            pieces.close()
            reading = _Reading(storage, manifest)
            data_args = ["--section=pre-data", "--section=data"]

            def feed() -> Iterator[bytes]:
                return reading.pieces()

        with contextlib.ExitStack() as streams:
            largest = None
            if split is not None:
                streams.callback(split.remove)
                # The largest table loads from its own reading of the object, at the same time.
                largest = streams.enter_context(
                    _LargestTableStream(
                        split, base, settings, storage, manifest, env, secret_values, verbose=watch
                    )
                )
                largest.start(on_table_loaded)
            with stream_command(
                [*base, *data_args, *(["--verbose"] if watch else [])],
                timeout=timeout,
                mode="write",
                env=env,
                secrets=secret_values,
            ) as cmd:
                loading = _LoadWatcher(cmd.stderr_reader.lines, on_table_loaded)
                if not _write_pieces(cmd.pipe, feed(), loading.poll):
                    reading.drain()  # pg_restore needed no more of it; the checksum needs it all
                reading.check()
            assert cmd.result is not None
            loading.done()
            commands.append(cmd.result.command_line)
            if largest is not None:
                commands.append(largest.finish())
        # Every row is in and checksummed: work that reads only the data (the drill's counts and
        # hashes) overlaps the index builds instead of following them.
        alongside = _Alongside(alongside_post_data)
        try:
            post = [*base, "--section=post-data", f"--jobs={cfg.restore_jobs}", head.name]
            result = run_command(post, timeout=timeout, env=env, secrets=secret_values, check=False)
            commands.append(result.command_line)
            if not result.ok and whole:
                raise CommandError(
                    f"pg_restore exited {result.returncode}: {result.command_line}\n{result.stderr[-4000:]}"
                )
        finally:
            alongside.join(raise_error=False)
    if result.ok:
        alongside.join()
        return commands
    # A catalog larger than the copy kept: read the archive again for the post-data section.
    with stream_command(
        [*base, "--section=post-data"], timeout=timeout, mode="write", env=env, secrets=secret_values
    ) as cmd:
        for piece in _Reading(storage, manifest).pieces():
            try:
                cmd.pipe.write(piece)
            except BrokenPipeError:
                break  # pg_restore read the catalog it needs and finished
    assert cmd.result is not None
    alongside.join()
    return [*commands, cmd.result.command_line]


class _Reading:
    """One reading of the stored object: decompressed pieces, with its size and sha256 counted, so
    :meth:`check` can compare them with the manifest once the stream is through."""

    def __init__(self, storage: Storage, manifest: BackupManifest) -> None:
        self._storage = storage
        self._manifest = manifest
        self._sha = hashlib.sha256()
        self._size = 0

    def _counted(self) -> Iterator[bytes]:
        for chunk in _verified_chunks(self._storage, self._manifest, final_check=False):
            self._sha.update(chunk)
            self._size += len(chunk)
            yield chunk

    def pieces(self) -> Iterator[bytes]:
        self._chunks = self._counted()
        return _decompressed(self._chunks)

    def drain(self) -> None:
        """Read (and count) the rest of the object without decompressing it."""
        for _ in self._chunks:
            pass

    def check(self) -> None:
        _check_digest(self._manifest, self._size, self._sha.hexdigest())


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
        base: list[str],
        settings: OpsSettings,
        storage: Storage,
        manifest: BackupManifest,
        env: dict[str, str],
        secret_values: list[str],
        *,
        verbose: bool,
    ) -> None:
        self._argv = [
            *base,
            "--section=data",
            "--use-list",
            str(split.rest),
            *(["--verbose"] if verbose else []),
        ]
        self._timeout = settings.backup.restore_timeout_seconds
        self._env = env
        self._secrets = secret_values
        self._reading = _Reading(storage, manifest)
        self._stack = contextlib.ExitStack()
        self._feeder: _Alongside | None = None
        self._cmd: StreamingCommand | None = None

    def __enter__(self) -> _LargestTableStream:
        self._cmd = self._stack.enter_context(
            stream_command(
                self._argv, timeout=self._timeout, mode="write", env=self._env, secrets=self._secrets
            )
        )
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


def restore_drill(settings: OpsSettings, storage: Storage, manifest: BackupManifest) -> TableComparison:
    """Restore into a scratch database, compare it with the manifest, drop it.

    Raises:
        BackupCorrupt: the object fails its checksum or pg_restore fails.
    """
    hash_algorithm(manifest)  # a hash this version cannot check fails here, before anything is made
    name = scratch_name(manifest.database, "drill")
    with _scratch_database(settings, name, owner=None):
        try:
            _, comparison = _restore_and_compare(settings, storage, manifest, name, unlogged_load=True)
        except CommandError as exc:
            raise BackupCorrupt(f"backup {manifest.id} does not restore: {exc}") from None
        return comparison


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


def verify_backup(settings: OpsSettings, backup_id: str, level: VerifyLevel) -> Verification:
    """Verify a backup at ``level`` and record the result in its manifest.

    ``checksum`` re-reads the object and checks size and sha256; ``catalog`` also lists the archive
    with ``pg_restore --list`` and checks every table has data; ``restore`` restores it into a scratch
    database and compares every table's rows (and content hash) with the manifest.

    Returns:
        The recorded verification (``ok`` False when the backup failed it).

    Raises:
        BackupNotFound: unknown id (nothing is recorded).
        ParameterError: unknown level.
    """
    if level not in VERIFY_RANK:
        raise ParameterError(f"verification level must be one of {', '.join(VERIFY_RANK)}, not {level!r}")
    storage = _storage(settings)
    manifest = resolve_backup_id(settings, backup_id)
    logger = run_logger(__name__)
    started = time.monotonic()
    try:
        if level == "checksum":
            detail, ok = checksum_backup(storage, manifest), True
        elif level == "catalog":
            detail, ok = catalog_backup(settings, storage, manifest), True
        else:
            comparison = restore_drill(settings, storage, manifest)
            detail, ok = comparison.summary(), comparison.matches
    except BackupCorrupt as exc:
        detail, ok = str(exc), False
    verification = Verification(
        level=level,
        ok=ok,
        at=datetime.now(UTC),
        detail=mask_text(detail),
        duration_seconds=round(time.monotonic() - started, 3),
    )
    _record(storage, manifest.id, verification)
    (logger.info if ok else logger.error)("backup %s %s verification: %s", manifest.id, level, detail)
    return verification


# --- restore --------------------------------------------------------------------------------------


def _connections(conn: psycopg.Connection, database: str) -> list[ConnectionInfo]:
    rows = conn.execute(
        "SELECT pid, coalesce(usename, ''), coalesce(application_name, ''),"
        " coalesce(client_addr::text, 'local'), coalesce(state, '') FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    ).fetchall()
    return [ConnectionInfo(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]


def restore_preflight(
    settings: OpsSettings,
    manifest: BackupManifest,
    *,
    target_database: str | None = None,
    keep_old: bool = False,
) -> RestorePreflight:
    """What restoring ``manifest`` into ``target_database`` would do; reads only."""
    target = target_database or manifest.database
    with _maintenance(settings) as conn:
        row = conn.execute(
            "SELECT pg_database_size(datname) FROM pg_database WHERE datname = %s", (target,)
        ).fetchone()
        exists = row is not None
        connections = _connections(conn, target) if exists else []
    return RestorePreflight(
        backup_id=manifest.id,
        backup_finished_at=manifest.finished_at,
        backup_size_bytes=manifest.size_bytes,
        backup_rows=manifest.total_rows,
        backup_verified=manifest.strongest_verified,
        target_database=target,
        target_exists=exists,
        target_size_bytes=int(row[0]) if row is not None else None,
        connections=connections,
        scratch_database=scratch_name(target, "restore"),
        old_database=kept_name(target) if exists else None,
        keep_old=keep_old,
    )


def _database_owner(conn: psycopg.Connection, database: str) -> str | None:
    row = conn.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (database,)
    ).fetchone()
    return str(row[0]) if row else None


def _carry_database_properties(conn: psycopg.Connection, source: str, dest: str) -> list[str]:
    """Give ``dest`` what a dump without ``--create`` does not hold, as ``source`` has it: its
    ``ALTER DATABASE``/``ALTER ROLE ... IN DATABASE`` settings, privileges, connection limit, comment.

    Each setting is applied with ``FROM CURRENT`` after ``set_config`` of the stored text, so list
    values (``search_path``) keep their quoting. One that cannot be applied (a superuser-only setting
    for a non-superuser) is skipped with a warning. Returns what could not be carried over.
    """
    row = conn.execute(
        "SELECT d.oid, d.datacl IS NOT NULL, d.datconnlimit, shobj_description(d.oid, 'pg_database'),"
        " pg_get_userbyid(d.datdba) FROM pg_database d WHERE d.datname = %s",
        (source,),
    ).fetchone()
    if row is None:
        return []
    source_oid, has_acl, connection_limit, comment, owner = row
    target = sql.Identifier(dest)
    # Steps of one or more statements; a step is applied whole or not at all (one savepoint each).
    steps: list[list[tuple[sql.Composable, tuple[object, ...]]]] = []
    for role, config in conn.execute(
        "SELECT r.rolname, s.setconfig FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole"
        " WHERE s.setdatabase = %s",
        (source_oid,),
    ).fetchall():
        scope = (
            sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(role), target)
            if role
            else sql.SQL("ALTER DATABASE {}").format(target)
        )
        for item in config or []:
            name, _, value = str(item).partition("=")
            steps.append(
                [
                    (sql.SQL("SELECT set_config(%s, %s, true)"), (name, value)),
                    (sql.SQL("{} SET {} FROM CURRENT").format(scope, sql.Identifier(name)), ()),
                ]
            )
    if has_acl:
        steps.append([(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(target), ())])
        for grantee, privilege, grantable in conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,"
            " a.privilege_type, a.is_grantable FROM pg_database d, aclexplode(d.datacl) a"
            " WHERE d.oid = %s",
            (source_oid,),
        ).fetchall():
            if grantee == owner:
                continue  # the owner's own rights come with ownership
            grant = sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(str(privilege)),
                target,
                sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL(""),
            )
            steps.append([(grant, ())])
    if connection_limit is not None and int(connection_limit) >= 0:
        limit = sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            target, sql.Literal(int(connection_limit))
        )
        steps.append([(limit, ())])
    if comment is not None:
        steps.append([(sql.SQL("COMMENT ON DATABASE {} IS {}").format(target, sql.Literal(comment)), ())])
    skipped: list[str] = []
    with conn.transaction():
        for step in steps:
            try:
                with conn.transaction():
                    for statement, params in step:
                        conn.execute(statement, params or None)
            except psycopg.Error as exc:
                text = step[-1][0].as_string(conn)
                skipped.append(text)
                run_logger(__name__).warning(
                    "restore: could not carry over to %s: %s (%s)", dest, text, exc.diag.message_primary
                )
    return skipped


def _swap(settings: OpsSettings, target: str, scratch: str, old: str | None) -> int:
    """Replace ``target`` by ``scratch`` in one transaction; returns how many sessions were ended."""
    with _maintenance(settings) as conn:
        if old is not None:
            _carry_database_properties(conn, target, scratch)
        if old is None:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(scratch), sql.Identifier(target)
                )
            )
            return 0
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(target)))
        terminated = 0
        try:
            deadline = time.monotonic() + 30
            while True:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (target,),
                ).fetchall()
                terminated += sum(1 for r in rows if r[0])
                try:
                    # Both renames or neither: a failure here leaves the old database in place.
                    with conn.transaction():
                        conn.execute(
                            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                sql.Identifier(target), sql.Identifier(old)
                            )
                        )
                        conn.execute(
                            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                sql.Identifier(scratch), sql.Identifier(target)
                            )
                        )
                    break
                except psycopg.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.execute(
                    sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(target))
                )
            raise
        # The old database stays open to psql and pg_dump, read-only by default: nothing connects to it
        # by its new name unless on purpose, and an operator recovering rows must be able to read them.
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(old)))
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(old))
        )
        return terminated


def kept_open_command(settings: OpsSettings, database: str) -> str:
    """The psql command that opens a kept database (password masked), read-only by default."""
    url = mask_url(postgres.libpq_dsn(settings.postgres.dsn.get_secret_value(), database=database))
    return f"psql '{url}'  (pg_dump -Fc -d '{url}' -t <table> to take rows out)"


def _kept_changes(
    settings: OpsSettings, manifest: BackupManifest, kept: str
) -> tuple[TableComparison | None, str | None]:
    """The kept database compared with the backup, or why it could not be (the restore stands)."""
    try:
        return compare_database_to_manifest(settings, manifest, kept), None
    except (BackupError, psycopg.Error) as exc:
        message = _pg_error(exc, settings) if isinstance(exc, psycopg.Error) else str(exc)
        run_logger(__name__).warning("restore: could not compare the kept database %s: %s", kept, message)
        return None, message


def restore_backup(
    settings: OpsSettings,
    backup_id: str,
    *,
    target_database: str | None = None,
    keep_old: bool = False,
    create_missing: bool = False,
    checksum_first: bool = True,
    database_lock_held: bool = False,
) -> RestoreResult:
    """Restore a backup so that the target is either untouched or fully restored, never half.

    Steps: resolve the backup; check the target exists (unless ``create_missing``); re-read the object
    and check its sha256 before anything is touched; restore into a new scratch database; compare it with
    the manifest; then, under an advisory lock, block and end the target's sessions and swap the two
    databases with ``ALTER DATABASE ... RENAME`` in one transaction. The old database is kept renamed
    (``<target>__old_<time>``, open to psql/pg_dump, read-only by default) when ``keep_old``, and
    compared with the backup so the result lists its tables whose rows changed since the backup's
    snapshot (the writes the restore took out of service); else it is dropped (by-hand restores only:
    automatic restores always keep it).

    Args:
        settings: the loaded settings.
        backup_id: an id, ``latest`` or ``latest-verified``.
        target_database: the database to replace; defaults to the backup's database.
        keep_old: keep the replaced database under its new name instead of dropping it.
        create_missing: allow restoring into a database that does not exist (recreate it).
        checksum_first: re-read the whole object and check it before anything else (a caller that
            just did so may skip it; the restore still checks the digest before the swap).
        database_lock_held: the caller holds the target's lock (:func:`database_lock_name`) on its
            own session, as a migration does for its whole run; else the restore takes it.

    Returns:
        The restore's change record, with the comparison proving the data equals the manifest.

    Raises:
        BackupNotFound / BackupNotVerified: the id does not resolve (nothing touched).
        DatabaseNotFound: the target does not exist and ``create_missing`` is False (nothing touched).
        BackupCorrupt: the object fails its checksum (nothing touched) or does not restore.
        RestoreFailed: the restored copy differs from the manifest (the target is untouched).
        LockBusy: another run works on the same database.
    """
    started = time.monotonic()
    logger = run_logger(__name__)
    manifest = resolve_backup_id(settings, backup_id)
    hash_algorithm(manifest)  # a hash this version cannot check fails here, before anything is touched
    target = target_database or manifest.database
    if not create_missing:
        _require_database(settings, target)
    storage = _storage(settings)
    if checksum_first:
        checksum_backup(storage, manifest)
    logger.info("backup %s checksum ok; restoring into a scratch database for %s", manifest.id, target)
    plan = restore_preflight(settings, manifest, target_database=target, keep_old=keep_old)
    commands: list[str] = []
    with contextlib.ExitStack() as held:
        lock_conn = held.enter_context(_maintenance(settings))
        owner = _database_owner(lock_conn, target)
        if not database_lock_held:
            # Named for a run that waits on another worker: flow run name and id, host, pid.
            holder = locks.Holder.current("restore-database")
            lock_conn.execute(
                "SELECT set_config('application_name', %s, false)", (holder.application_name(),)
            )
            held.enter_context(
                postgres.advisory_lock(
                    lock_conn,
                    database_lock_name(target),
                    settings.backup.lock_timeout_seconds,
                    holder=holder.describe(),
                )
            )
        with _scratch_database(settings, plan.scratch_database, owner=owner) as scratch:
            try:
                ran, comparison = _restore_and_compare(
                    settings, storage, manifest, scratch, unlogged_load=False
                )
            except CommandError as exc:
                raise RestoreFailed(
                    f"pg_restore of backup {manifest.id} failed; {target} was not touched and the scratch"
                    f" database was dropped: {exc}"
                ) from None
            commands += ran
            if not comparison.matches:
                raise RestoreFailed(
                    f"the restored copy does not match backup {manifest.id}; {target} was not touched:"
                    f" {comparison.summary()}"
                )
            old = plan.old_database if database_exists(settings, target) else None
            terminated = _swap(settings, target, scratch, old)
            commands.append(
                f"ALTER DATABASE {target} RENAME TO {old}; ALTER DATABASE {scratch} RENAME TO {target}"
                if old
                else f"ALTER DATABASE {scratch} RENAME TO {target}"
            )
            # The scratch name no longer exists; nothing to drop.
        if old is not None and not keep_old:
            drop_database(settings, old)
            commands.append(f"DROP DATABASE {old}")
    logger.info("restored backup %s into %s (%s sessions ended)", manifest.id, target, terminated)
    kept_changes, kept_error = (None, None)
    if old is not None and keep_old:
        kept_changes, kept_error = _kept_changes(settings, manifest, old)
        if kept_changes is not None and not kept_changes.matches:
            logger.warning(
                "the kept database %s has rows that changed since backup %s in: %s",
                old,
                manifest.id,
                ", ".join(d.table for d in kept_changes.differences),
            )
    return RestoreResult(
        backup_id=manifest.id,
        target_database=target,
        scratch_database=plan.scratch_database,
        old_database=old,
        old_kept=old is not None and keep_old,
        terminated_connections=terminated,
        comparison=comparison,
        commands=commands,
        duration_seconds=round(time.monotonic() - started, 3),
        kept_changes=kept_changes,
        kept_compare_error=kept_error,
        kept_open_command=kept_open_command(settings, old) if old is not None and keep_old else "",
    )


@dataclass(frozen=True)
class SwapBackPreflight:
    """What putting a kept database back in place would do, computed without touching anything."""

    kept_database: str
    target_database: str
    kept_size_bytes: int
    target_size_bytes: int
    connections: list[ConnectionInfo]
    replaced_database: str

    def steps(self) -> list[str]:
        return [
            f"count and hash every table of {self.kept_database}",
            f"block new connections to {self.target_database} and end its {len(self.connections)} sessions",
            f"rename {self.target_database} -> {self.replaced_database} and {self.kept_database} ->"
            f" {self.target_database} in one transaction",
            f"keep {self.replaced_database} (read-only by default): nothing is dropped",
            f"count and hash every table of {self.target_database} and prove it equals what"
            f" {self.kept_database} held",
        ]


_STAMP = "%Y%m%d%H%M%S"


def kept_name(target: str, at: datetime | None = None) -> str:
    """The name a restore gives the database it replaces: ``<target>__old_<UTC time>``, at most 63 bytes."""
    stamp = (at or datetime.now(UTC)).strftime(_STAMP)
    return target[: 63 - len(stamp) - 6] + f"__old_{stamp}"


def _is_kept_of(kept: str, target: str) -> bool:
    prefix = target[: 63 - len(datetime.now(UTC).strftime(_STAMP)) - 6] + "__old_"
    return kept.startswith(prefix) and kept[len(prefix) :].isdigit()


def swap_back_preflight(
    settings: OpsSettings, kept_database: str, *, target_database: str
) -> SwapBackPreflight:
    """What :func:`swap_back` would do; reads only.

    Raises:
        ParameterError: ``kept_database`` is not a database a restore of ``target_database`` kept.
        DatabaseNotFound: either database does not exist.
    """
    if not _is_kept_of(kept_database, target_database):
        raise ParameterError(
            f"{kept_database!r} is not a database a restore of {target_database!r} kept (those are named"
            f" {kept_name(target_database)[:-14]}<time>); nothing was done"
        )
    with _maintenance(settings) as conn:
        sizes = dict(
            conn.execute(
                "SELECT datname, pg_database_size(datname) FROM pg_database WHERE datname = ANY(%s)",
                ([kept_database, target_database],),
            ).fetchall()
        )
        for name in (kept_database, target_database):
            if name not in sizes:
                raise DatabaseNotFound(
                    f"database {name!r} does not exist on {_server(settings)}; nothing was done"
                )
        connections = _connections(conn, target_database)
        # A swap back within the same second as the restore would reuse the kept name: step past it.
        now = datetime.now(UTC)
        replaced = kept_name(target_database, now)
        for seconds in range(1, 120):
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (replaced,)).fetchone():
                break
            replaced = kept_name(target_database, now + timedelta(seconds=seconds))
    return SwapBackPreflight(
        kept_database=kept_database,
        target_database=target_database,
        kept_size_bytes=int(sizes[kept_database]),
        target_size_bytes=int(sizes[target_database]),
        connections=connections,
        replaced_database=replaced,
    )


def _database_stats(settings: OpsSettings, database: str) -> dict[str, TableStats]:
    """Counts and content hashes of every table of ``database`` in one read-only snapshot."""
    timeout_ms = int(settings.backup.restore_timeout_seconds * 1000)
    with _connect(settings, database, purpose="backup-compare") as conn:
        conn.execute(f"SET statement_timeout = {timeout_ms}")
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return table_stats(conn, algorithm=CONTENT_HASH_ALGORITHM)


def swap_back(
    settings: OpsSettings,
    kept_database: str,
    *,
    target_database: str,
    database_lock_held: bool = False,
) -> RestoreResult:
    """Undo a restore: put the database it kept back in place of ``target_database``, with proof.

    The kept database's tables are counted and hashed; its read-only default is lifted; then, under the
    target's lock, the target's sessions are ended and the two are swapped by rename in one transaction
    (the current target is kept as ``<target>__old_<time>``, read-only by default: nothing is dropped);
    finally the target is counted and hashed again and compared with what the kept database held.
    Stop the application's writers first (recover-data's scale to 0, maintenance mode): a write that
    lands between the swap and that count shows up as a difference (both databases are kept then).

    Returns:
        The change record; ``comparison`` proves the target now holds what was kept, ``old_database``
        names the database it replaced.

    Raises:
        ParameterError / DatabaseNotFound: nothing was touched.
        RestoreFailed: the target after the swap differs from what was kept (both databases stay).
        LockBusy: another run works on the same database.
    """
    started = time.monotonic()
    plan = swap_back_preflight(settings, kept_database, target_database=target_database)
    logger = run_logger(__name__)
    before = _database_stats(settings, kept_database)
    with contextlib.ExitStack() as held:
        lock_conn = held.enter_context(_maintenance(settings))
        if not database_lock_held:
            held.enter_context(
                postgres.advisory_lock(
                    lock_conn, database_lock_name(target_database), settings.backup.lock_timeout_seconds
                )
            )
        lock_conn.execute(
            sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(
                sql.Identifier(kept_database)
            )
        )
        terminated = _swap(settings, target_database, kept_database, plan.replaced_database)
    after = _database_stats(settings, target_database)
    comparison = compare_stats(
        before, after, database=target_database, backup_id=f"kept database {kept_database}"
    )
    if not comparison.matches:
        raise RestoreFailed(
            f"{target_database} after the swap differs from what {kept_database} held:"
            f" {comparison.summary()}; the database it replaced is kept as {plan.replaced_database}"
        )
    logger.info("swapped %s back in as %s; %s kept", kept_database, target_database, plan.replaced_database)
    return RestoreResult(
        backup_id=kept_database,
        target_database=target_database,
        scratch_database=kept_database,
        old_database=plan.replaced_database,
        old_kept=True,
        terminated_connections=terminated,
        comparison=comparison,
        commands=[
            f"ALTER DATABASE {kept_database} RESET default_transaction_read_only",
            f"ALTER DATABASE {target_database} RENAME TO {plan.replaced_database};"
            f" ALTER DATABASE {kept_database} RENAME TO {target_database}",
            f"ALTER DATABASE {plan.replaced_database} SET default_transaction_read_only = on",
        ],
        duration_seconds=round(time.monotonic() - started, 3),
        kept_open_command=kept_open_command(settings, plan.replaced_database),
    )


# --- retention ------------------------------------------------------------------------------------


def plan_retention(
    manifests: list[BackupManifest],
    *,
    keep_last: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    timezone: str = "UTC",
    protected: Iterable[str] = (),
) -> list[RetentionDecision]:
    """Decide which backups to keep: the newest ``keep_last``, the newest of each of the last
    ``keep_daily`` days / ``keep_weekly`` ISO weeks / ``keep_monthly`` months (that have backups), and
    every ``protected`` id (the newest verified backups). Pure: the same input gives the same plan."""
    zone = ZoneInfo(timezone)
    ordered = sorted(manifests, key=lambda m: (m.finished_at, m.id), reverse=True)
    reasons: dict[str, list[str]] = {m.id: [] for m in ordered}
    for m in ordered[:keep_last]:
        reasons[m.id].append("keep-last")
    tiers: list[tuple[str, int, Callable[[datetime], object]]] = [
        ("daily", keep_daily, lambda t: t.date()),
        ("weekly", keep_weekly, lambda t: t.isocalendar()[:2]),
        ("monthly", keep_monthly, lambda t: (t.year, t.month)),
    ]
    for label, count, bucket_of in tiers:
        seen: list[object] = []
        for m in ordered:
            bucket = bucket_of(m.finished_at.astimezone(zone))
            if bucket in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(bucket)
            reasons[m.id].append(label)
    for backup_id in protected:
        if backup_id in reasons:
            reasons[backup_id].append("newest verified")
    return [
        RetentionDecision(m.id, m.database, m.finished_at, bool(reasons[m.id]), reasons[m.id])
        for m in ordered
    ]


def retention_plan(
    settings: OpsSettings, database: str | None = None, *, now: datetime | None = None
) -> RetentionPlan:
    """The retention plan for every database's backups (or one's), plus stale unfinished objects.

    A backup whose manifest does not parse is ``unknown``: listed with the parse error, never a
    candidate for deletion and never an orphan. Orphans are data objects with no manifest at all, older
    than ``backup.orphan_grace_hours`` (looked for only when planning every database).
    """
    cfg = settings.backup
    storage = _storage(settings)
    manifests, unknown = scan_backups(storage, database)
    for entry in unknown:
        run_logger(__name__).error("backup %s is kept as unknown: %s", entry.backup_id, entry.error)
    decisions: list[RetentionDecision] = []
    for db in sorted({m.database for m in manifests}):
        mine = [m for m in manifests if m.database == db]
        protected = {
            m.id
            for level in ("restore", "catalog", "checksum")
            if (m := next((x for x in mine if x.verified(level)), None)) is not None  # type: ignore[arg-type]
        }
        decisions += plan_retention(
            mine,
            keep_last=cfg.keep_last,
            keep_daily=cfg.keep_daily,
            keep_weekly=cfg.keep_weekly,
            keep_monthly=cfg.keep_monthly,
            timezone=cfg.timezone,
            protected=protected,
        )
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=cfg.orphan_grace_hours)
    unfinished = [u for u in storage.list_unfinished(DATA_DIR) if u.started < cutoff]
    orphans: list[str] = []
    if database is None:
        known = {m.id for m in manifests} | {u.backup_id for u in unknown}
        for item in storage.list(DATA_DIR):
            backup_id = item.key.removeprefix(f"{DATA_DIR}/").removesuffix(".dump.zst")
            if backup_id not in known and item.modified < cutoff:
                orphans.append(item.key)
    return RetentionPlan(decisions=decisions, unfinished=unfinished, orphans=orphans, unknown=unknown)


def delete_backups(settings: OpsSettings, plan: RetentionPlan, *, confirm: bool = False) -> PruneResult:
    """The one function that deletes backups: without ``confirm`` it only reports what it would delete.

    The manifest goes first (the backup leaves every listing at once), then the data object. A backup
    the plan keeps, or whose manifest it could not read, is never touched, whatever else is passed; an
    orphan whose manifest has appeared since the plan (a backup that finished) is left alone.
    """
    logger = run_logger(__name__)
    doomed = [d for d in plan.to_delete if "newest verified" not in d.reasons]
    if not confirm:
        for d in doomed:
            logger.info("would delete backup %s (%s, %s)", d.backup_id, d.database, d.finished_at.isoformat())
        return PruneResult(True, plan, [], [], [])
    storage = _storage(settings)
    deleted, objects, discarded = [], [], []
    for d in doomed:
        storage.delete(manifest_key(d.backup_id))
        storage.delete(data_key(d.backup_id))
        deleted.append(d.backup_id)
        logger.info("deleted backup %s (%s)", d.backup_id, d.database)
    unknown = {u.backup_id for u in plan.unknown}
    for key in plan.orphans:
        backup_id = key.removeprefix(f"{DATA_DIR}/").removesuffix(".dump.zst")
        if backup_id in unknown or storage.exists(manifest_key(backup_id)):
            logger.info("kept %s: its backup has a manifest now", key)
            continue
        if storage.delete(key):
            objects.append(key)
    for item in plan.unfinished:
        storage.discard_unfinished(item)
        discarded.append(item.key)
    return PruneResult(False, plan, deleted, objects, discarded)


def prune_backups(
    settings: OpsSettings, database: str | None = None, *, confirm: bool = False
) -> PruneResult:
    """Plan retention and delete what it selects (only with ``confirm``)."""
    return delete_backups(settings, retention_plan(settings, database), confirm=confirm)


# --- Prefect task wrappers ------------------------------------------------------------------------


def _transient(task: object, task_run: object, state: State) -> bool:
    """Retry only what another attempt can fix: not a bad id, a missing database or a corrupt backup."""
    try:
        state.result()
    except (
        BackupNotFound,
        BackupNotVerified,
        ManifestUnreadable,
        DatabaseNotFound,
        BackupCorrupt,
        RestoreFailed,
        ParameterError,
    ):
        return False
    except Exception:  # network, storage or a killed command: another attempt may pass
        return True
    return True


def _wrap(fn: Callable[..., object], name: str, retries: int = 0, delay: float = 0) -> Any:
    return task(
        fn,
        name=name,
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=delay,
        retry_condition_fn=_transient if retries else None,
    )


def _checksum(settings: OpsSettings, manifest: BackupManifest) -> str:
    """Re-read the stored object of ``manifest`` and check its size and sha256."""
    return checksum_backup(_storage(settings), manifest)


# A failed dump leaves no manifest (and its object is aborted), so running it again is safe.
create_backup_task = _wrap(create_backup, "create-backup", retries=2, delay=30)
verify_backup_task = _wrap(verify_backup, "verify-backup", retries=1, delay=10)
# The swap is atomic and the scratch database is dropped on failure: a retry starts clean.
restore_backup_task = _wrap(restore_backup, "restore-backup", retries=1, delay=30)
resolve_backup_task = _wrap(resolve_backup_id, "resolve-backup")
list_backups_task = _wrap(list_backups, "list-backups")
restore_preflight_task = _wrap(restore_preflight, "restore-preflight")
checksum_backup_task = _wrap(_checksum, "checksum-backup", retries=1, delay=10)
retention_plan_task = _wrap(retention_plan, "plan-retention")
delete_backups_task = _wrap(delete_backups, "delete-backups")
compare_database_task = _wrap(compare_database_to_manifest, "compare-database-to-manifest")
swap_back_preflight_task = _wrap(swap_back_preflight, "swap-back-preflight")
# No retries: a failed proof must be looked at, not swapped again.
swap_back_task = _wrap(swap_back, "swap-back-kept-database")

__all__ = [
    "BackupCorrupt",
    "BackupError",
    "BackupManifest",
    "BackupNotFound",
    "BackupNotVerified",
    "DatabaseNotFound",
    "ManifestUnreadable",
    "PruneResult",
    "RestoreFailed",
    "RestorePreflight",
    "RestoreResult",
    "RetentionPlan",
    "TableComparison",
    "TableStats",
    "UnreadableManifest",
    "Verification",
    "compare_database_to_manifest",
    "create_backup",
    "latest_verified",
    "list_backups",
    "prune_backups",
    "resolve_backup_id",
    "restore_backup",
    "verify_backup",
]
