"""A stored archive read back: its bytes checked against the manifest (size, sha256), decompressed,
and its catalog listed (the checksum and catalog verifications)."""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterable, Iterator

import zstandard

from tasks.backup.database import _archive_major
from tasks.backup.errors import BackupCorrupt
from tasks.backup.manifest import BackupManifest, data_key
from tasks.commands import run_command
from tasks.pgtools import choose_client
from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, Storage

_PIPE_CHUNK = 1 << 20


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


def _decompressed(chunks: Iterable[bytes]) -> Generator[bytes, None, None]:
    """zstd-decompress a stream of chunks without holding it whole."""
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    for chunk in chunks:
        out = decompressor.decompress(chunk)
        if out:
            yield out
    if not decompressor.eof:
        raise BackupCorrupt("the backup's zstd stream ends early (truncated object)")


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

    def pieces(self) -> Generator[bytes, None, None]:
        self._chunks = self._counted()
        return _decompressed(self._chunks)

    def drain(self) -> None:
        """Read (and count) the rest of the object without decompressing it."""
        for _ in self._chunks:
            pass

    def check(self) -> None:
        _check_digest(self._manifest, self._size, self._sha.hexdigest())


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
    # No server here: a pg_restore at least as new as the archive's pg_dump reads it.
    archive = _archive_major(manifest.pg_dump_version)
    program = settings.backup.pg_restore
    if archive is not None:
        program = choose_client("pg_restore", program, archive).path
    result = run_command(
        [program, "--list"],
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
