"""Base backups for point-in-time recovery, and the retention of base backups and WAL together.

``pg_basebackup --format=tar --pgdata=- --wal-method=none`` (the WAL comes from the archive) is
streamed through in-process zstd and sha256 into the storage; its start and stop LSN (from
pg_basebackup's verbose output), timeline and times go into a manifest written last, like the
logical backups' (same id scheme, same ``Verification`` records)::

    base/manifests/<id>.json     the manifest
    base/data/<id>.tar.zst       the cluster's files

A base backup is restorable once the WAL from its start segment to its stop segment is archived.
Retention keeps the newest ``wal.keep_base_backups`` base backups and removes only the WAL older than
the oldest kept one's start segment: WAL a kept base backup needs is never selected.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zstandard
from pydantic import BaseModel, Field

from tasks.backup import BackupCorrupt, BackupNotFound, Verification, new_backup_id
from tasks.commands import run_command, stream_command
from tasks.errors import CommandError, OpsError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, Storage, open_storage
from tasks.wal import archive
from tasks.wal.names import format_lsn, parse_lsn, segment_of
from tasks.wal.server import connect, tool_connection

BASE_DIR = "base"
FORMAT = "pg_basebackup-tar"
_CHUNK = 1 << 20
_START_RE = re.compile(r"START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+)")
_TIMELINE_RE = re.compile(r"START TIMELINE: (\d+)")
_BLOCK = 512


class BaseBackupError(OpsError):
    """A base backup could not be taken or used."""


class BaseBackupManifest(BaseModel):
    """One base backup; JSON beside the tar, written last (an unfinished one is never listed)."""

    id: str
    stack: str = ""
    source: str = Field(default="", description="the server, password masked")
    started_at: datetime
    finished_at: datetime
    size_bytes: int = Field(description="size of the stored (compressed) tar")
    raw_size_bytes: int
    sha256: str = Field(description="sha256 of the stored object")
    compression: str = "zstd"
    format: str = FORMAT
    data_key: str
    tool_version: str
    server_version: str
    timeline: int
    start_lsn: str
    stop_lsn: str
    wal_segment_size: int
    verifications: list[Verification] = Field(default_factory=list)

    @property
    def start_wal(self) -> str:
        """The first segment a restore of this backup replays."""
        return segment_of(parse_lsn(self.start_lsn), self.timeline, self.wal_segment_size).name

    @property
    def stop_wal(self) -> str:
        """The segment holding the stop LSN: replay must reach it before the copy is consistent."""
        return segment_of(parse_lsn(self.stop_lsn), self.timeline, self.wal_segment_size).name


@dataclass(frozen=True)
class BasePruneResult:
    """What base-backup retention kept, and deleted (or, on a dry run, would delete)."""

    dry_run: bool
    kept: list[str]
    deleted_backups: list[str]
    deleted_wal: list[str]
    first_kept_wal: str | None


class _TarScan:
    """Reads tar headers as the stream passes and keeps the content of a few small members.

    With ``--wal-method=none`` pg_basebackup prints no WAL positions; they are in the stream itself:
    ``backup_label`` (start LSN, timeline) and the injected ``backup_manifest`` (its ``WAL-Ranges``
    hold the end LSN).
    """

    def __init__(self, wanted: set[str]) -> None:
        self.wanted = wanted
        self.found: dict[str, bytes] = {}
        self._header = bytearray()
        self._left = 0  # bytes of the current member still to pass, padding included
        self._size = 0
        self._name = ""
        self._capture: bytearray | None = None

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left:
                take = min(self._left, len(view))
                if self._capture is not None:
                    self._capture += view[:take]
                view = view[take:]
                self._left -= take
                if not self._left and self._capture is not None:
                    self.found[self._name] = bytes(self._capture[: self._size])
                    self._capture = None
                continue
            need = _BLOCK - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) < _BLOCK:
                return
            header, self._header = bytes(self._header), bytearray()
            if not header.strip(b"\0"):
                continue
            name = header[:100].split(b"\0")[0].decode(errors="replace")
            prefix = header[345:500].split(b"\0")[0].decode(errors="replace")
            self._name = f"{prefix}/{name}" if prefix else name
            raw_size = header[124:136]
            if raw_size[0] & 0x80:  # base-256 for members over 8 GB
                self._size = int.from_bytes(raw_size[1:], "big")
            else:
                self._size = int(raw_size.split(b"\0")[0].strip() or b"0", 8)
            self._left = -(-self._size // _BLOCK) * _BLOCK
            self._capture = bytearray() if self._name in self.wanted and self._size < (64 << 20) else None
            if self._left == 0 and self._capture is not None:
                self.found[self._name] = b""
                self._capture = None


def _wal_range(scan: _TarScan) -> tuple[str, int, str]:
    """(start LSN, timeline, end LSN) of the base backup, from its label and manifest."""
    import json

    label = scan.found.get("backup_label", b"").decode(errors="replace")
    start, timeline = _START_RE.search(label), _TIMELINE_RE.search(label)
    try:
        ranges = json.loads(scan.found["backup_manifest"])["WAL-Ranges"]
        end = max((r["End-LSN"] for r in ranges), key=parse_lsn)
    except (KeyError, ValueError):
        end = None
    if start is None or timeline is None or end is None:
        raise BaseBackupError(
            "the base backup stream holds no backup_label or backup_manifest with its WAL range; nothing"
            " was kept. Check that pg_basebackup is version 13 or later and writes a manifest"
        )
    return start.group(1), int(timeline.group(1)), str(end)


def manifest_key(backup_id: str) -> str:
    return f"{BASE_DIR}/manifests/{backup_id}.json"


def data_key(backup_id: str) -> str:
    return f"{BASE_DIR}/data/{backup_id}.tar.zst"


def _storage(settings: OpsSettings) -> Storage:
    return open_storage(settings.storage, attempts=settings.backup.upload_attempts)


def create_base_backup(settings: OpsSettings, *, storage: Storage | None = None) -> BaseBackupManifest:
    """Take a base backup of the whole cluster into the storage and write its manifest.

    Returns:
        The manifest (start/stop LSN, timeline, segment size, sizes, sha256).

    Raises:
        WalServerError: the server cannot be reached as the replication role.
        CommandError: pg_basebackup failed (the unfinished object is removed, no manifest written).
        StorageError: the storage refused the upload.
    """
    storage = storage or _storage(settings)
    logger = run_logger(__name__)
    cfg = settings.wal
    with connect(settings, purpose="base-backup") as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'),"
            " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
        ).fetchone()
    assert row is not None
    server_version, segment_size = str(row[0]), int(row[1])
    tool_version = run_command([cfg.pg_basebackup, "--version"], timeout=30).stdout.strip()
    started = datetime.now(UTC)
    backup_id = new_backup_id("cluster", started)
    key = data_key(backup_id)
    target = tool_connection(settings)
    argv = [
        cfg.pg_basebackup,
        "--pgdata=-",
        "--format=tar",
        "--wal-method=none",
        "--checkpoint=fast",
        "--manifest-checksums=NONE",
        "--no-password",
        f"--label=swagger2mcp-ops {backup_id}",
        f"--dbname={target.url}",
    ]
    sha = hashlib.sha256()
    size = raw = 0
    scan = _TarScan({"backup_label", "backup_manifest"})
    compressor = zstandard.ZstdCompressor(level=cfg.zstd_level)
    with storage.open_write(key) as writer:

        class _Sink:
            def write(self, data: bytes) -> int:
                nonlocal size
                sha.update(data)
                size += len(data)
                writer.write(data)
                return len(data)

        with (
            stream_command(
                argv, timeout=cfg.basebackup_timeout_seconds, env=target.env, secrets=target.secrets
            ) as cmd,
            compressor.stream_writer(_Sink(), closefd=False) as zwriter,  # type: ignore[arg-type]
        ):
            while chunk := cmd.pipe.read(_CHUNK):
                zwriter.write(chunk)
                scan.feed(chunk)
                raw += len(chunk)
        # Raised inside the write: the object is discarded and no manifest is written.
        start_lsn, timeline, stop_lsn = _wal_range(scan)
    manifest = BaseBackupManifest(
        id=backup_id,
        stack=settings.stack,
        source=target.shown.split("@")[-1].split("/")[0],
        started_at=started,
        finished_at=datetime.now(UTC),
        size_bytes=size,
        raw_size_bytes=raw,
        sha256=sha.hexdigest(),
        data_key=key,
        tool_version=tool_version,
        server_version=server_version,
        timeline=timeline,
        start_lsn=format_lsn(parse_lsn(start_lsn)),
        stop_lsn=format_lsn(parse_lsn(stop_lsn)),
        wal_segment_size=segment_size,
    )
    write_manifest(storage, manifest)
    logger.info(
        "base backup %s: %s bytes (raw %s), WAL %s..%s",
        backup_id,
        size,
        raw,
        manifest.start_lsn,
        manifest.stop_lsn,
    )
    return manifest


def write_manifest(storage: Storage, manifest: BaseBackupManifest) -> None:
    storage.put_bytes(manifest_key(manifest.id), manifest.model_dump_json(indent=2).encode())


def list_base_backups(settings: OpsSettings, *, storage: Storage | None = None) -> list[BaseBackupManifest]:
    """Finished base backups, newest first."""
    storage = storage or _storage(settings)
    found = []
    for item in storage.list(f"{BASE_DIR}/manifests"):
        if item.key.endswith(".json"):
            try:
                found.append(BaseBackupManifest.model_validate_json(storage.get_bytes(item.key)))
            except (ObjectNotFound, ValueError):
                run_logger(__name__).warning("skipping unreadable base backup manifest %s", item.key)
    return sorted(found, key=lambda m: (m.finished_at, m.id), reverse=True)


def read_base_manifest(storage: Storage, backup_id: str) -> BaseBackupManifest:
    """The manifest of ``backup_id``.

    Raises:
        BackupNotFound: no such finished base backup.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}", backup_id):
        raise BackupNotFound(f"{backup_id!r} is not a base backup id")
    try:
        return BaseBackupManifest.model_validate_json(storage.get_bytes(manifest_key(backup_id)))
    except ObjectNotFound:
        raise BackupNotFound(f"no base backup {backup_id!r} in {storage.location}; run backup-base") from None


def wal_ready(storage: Storage, manifest: BaseBackupManifest) -> bool:
    """Whether the archive holds the WAL up to the base backup's stop segment (finished or partial)."""
    listing = archive.list_archive(storage)
    stop = manifest.stop_wal
    return stop in listing.segments or stop in listing.partials


def extract_base_backup(
    storage: Storage, manifest: BaseBackupManifest, dest: Path, *, timeout: float = 24 * 3600
) -> None:
    """Unpack the base backup into ``dest`` as it streams from the storage, then check its sha256.

    zstd runs in this process; the files are written by ``tar``, several times faster than Python's
    tarfile (writing the cluster's files is most of a restore's unpacking). GNU tar keeps every member
    inside ``dest`` (no absolute names, no ``..``, links to outside made harmless); the checksum then
    proves the object is the one the backup stored.

    Raises:
        BackupCorrupt: the object is missing, truncated or altered (``dest`` must then be discarded).
    """
    sha = hashlib.sha256()
    size = 0
    dest.mkdir(parents=True, exist_ok=True)
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    argv = ["tar", "--extract", "--file=-", f"--directory={dest}", "--no-same-owner"]
    try:
        with stream_command(argv, timeout=timeout, mode="write") as tar:
            writing = True
            for chunk in storage.iter_chunks(manifest.data_key):
                sha.update(chunk)
                size += len(chunk)
                if not writing:
                    continue  # tar has the whole archive: the rest is its end padding, still checksummed
                unpacked = decompressor.decompress(chunk)
                try:
                    tar.pipe.write(unpacked)
                except BrokenPipeError:
                    writing = False  # tar stopped reading: its exit status says whether it had it all
            if writing and not decompressor.eof:
                raise BackupCorrupt(f"base backup {manifest.id} is truncated (its zstd stream does not end)")
    except ObjectNotFound:
        raise BackupCorrupt(f"base backup {manifest.id}: its data object is missing") from None
    except (CommandError, zstandard.ZstdError) as exc:
        raise BackupCorrupt(f"base backup {manifest.id} does not unpack: {exc}; use another one") from None
    if size != manifest.size_bytes or sha.hexdigest() != manifest.sha256:
        raise BackupCorrupt(
            f"base backup {manifest.id} is truncated or altered ({size} bytes, manifest says"
            f" {manifest.size_bytes}, sha256 {'differs' if size == manifest.size_bytes else 'not checked'});"
            " nothing was restored; use another base backup"
        )


def prune_base_backups(
    settings: OpsSettings, *, confirm: bool = False, storage: Storage | None = None
) -> BasePruneResult:
    """Keep the newest ``wal.keep_base_backups`` base backups and the WAL from the oldest kept one's
    start segment on; delete the rest only with ``confirm`` (else report it)."""
    storage = storage or _storage(settings)
    manifests = list_base_backups(settings, storage=storage)
    kept = manifests[: settings.wal.keep_base_backups]
    doomed = manifests[settings.wal.keep_base_backups :]
    first_kept = min((m.start_wal for m in kept), key=lambda n: (n[:8], n[8:]), default=None)
    # No base backup yet: every segment may be needed by the first one's predecessor, keep all.
    wal = archive.delete_before(storage, first_kept, confirm=confirm) if first_kept else []
    if confirm:
        for manifest in doomed:
            storage.delete(manifest_key(manifest.id))
            storage.delete(manifest.data_key)
    return BasePruneResult(
        dry_run=not confirm,
        kept=[m.id for m in kept],
        deleted_backups=[m.id for m in doomed],
        deleted_wal=wal,
        first_kept_wal=first_kept,
    )
