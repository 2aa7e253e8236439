"""The manifest of a backup (the model, its storage keys) and reading it back: read, list, scan, resolve.

The manifest is written last: a backup without one is unfinished and never listed."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from tasks.backup.errors import BackupNotFound, BackupNotVerified, ManifestUnreadable
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, Storage, open_storage

VerifyLevel = Literal["checksum", "catalog", "restore"]
VERIFY_RANK: dict[str, int] = {"checksum": 1, "catalog": 2, "restore": 3}
VERIFY_LEVELS_STRONGEST_FIRST: tuple[VerifyLevel, ...] = ("restore", "catalog", "checksum")
COMPRESSION = "zstd"
FORMAT = "pg_dump-custom"


MANIFEST_DIR = "manifests"
DATA_DIR = "data"


_IDENT_SAFE = re.compile(r"[^a-zA-Z0-9_]+")


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
    snapshot_lsn: str | None = Field(
        default=None,
        description="WAL insert position read in the statement that exported the dump's snapshot: every"
        " transaction the snapshot sees has its commit record before it (None: an older manifest, or a"
        " dump from a standby)",
    )
    snapshot_timeline: int | None = Field(default=None, description="the server's timeline at snapshot_lsn")
    snapshot_xids: str | None = Field(
        default=None,
        description="the snapshot itself (pg_current_snapshot: xmin:xmax:in-progress xids), to tell which"
        " transactions committing at that moment it did not see",
    )
    system_identifier: str | None = Field(
        default=None, description="the cluster's pg_control system identifier (which WAL archive fits)"
    )
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
        for level in VERIFY_LEVELS_STRONGEST_FIRST:
            if self.verified(level):
                return level
        return None


@dataclass(frozen=True)
class UnreadableManifest:
    """A backup whose manifest exists but does not parse: its state is unknown, so it is never deleted."""

    backup_id: str
    key: str
    error: str
    database: str | None = None


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


def _storage(settings: OpsSettings) -> Storage:
    return open_storage(settings.storage, attempts=settings.backup.upload_attempts)


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
