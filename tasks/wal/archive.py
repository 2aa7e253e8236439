"""The WAL archive in the storage backend: ship, list, check and fetch segments.

Layout under the storage URL (beside the logical backups' ``manifests/`` and ``data/``)::

    wal/<timeline>/<segment>.zst            a finished segment, zstd-compressed
    wal/<timeline>/<segment>.json           its record (sizes, sha256 of both forms), written last
    wal/<timeline>/<segment>.partial.zst    the segment being written, shipped for the RPO
    wal/<timeline>/<segment>.partial.json   (replaced on every ship, removed once the segment is done)
    wal/history/<timeline>.history.zst/.json  timeline history files

A segment without its record is unfinished and does not count; the record's sha256 of the stored
object is checked before a byte is handed to recovery, and the decompressed size and sha256 after.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import zstandard
from pydantic import BaseModel

from tasks.errors import CheckFailed, OpsError
from tasks.storage import ObjectInfo, ObjectNotFound, Storage
from tasks.wal.names import (
    PARTIAL_SUFFIX,
    WalNameError,
    is_history_name,
    is_segment_name,
    missing_segments,
)

WAL_DIR = "wal"


class WalArchiveError(OpsError):
    """The WAL archive cannot be used for what was asked."""


class SegmentMissing(WalArchiveError):
    """A WAL file is not in the archive."""


class SegmentCorrupt(CheckFailed):
    """A stored WAL file does not match its record (size or sha256)."""


class SegmentRecord(BaseModel):
    """What was shipped for one WAL file; stored as JSON after the data object."""

    name: str
    partial: bool = False
    size_bytes: int
    sha256: str
    raw_size_bytes: int
    raw_sha256: str
    shipped_at: datetime
    compression: str = "zstd"


@dataclass(frozen=True)
class ArchiveListing:
    """The finished records in the archive: segments, partial segments and history files."""

    segments: dict[str, ObjectInfo] = field(default_factory=dict)
    partials: dict[str, ObjectInfo] = field(default_factory=dict)
    histories: dict[str, ObjectInfo] = field(default_factory=dict)

    def newest(self) -> tuple[str, datetime] | None:
        """The newest shipped WAL (a partial counts: it holds the latest changes) and when it arrived."""
        items = [*self.segments.items(), *self.partials.items()]
        if not items:
            return None
        name, info = max(items, key=lambda kv: (kv[1].modified, kv[0]))
        return name, info.modified


@dataclass(frozen=True)
class ArchiveCheck:
    """Segments asked for, and which of them are missing or do not match their records."""

    checked: list[str]
    missing: list[str]
    corrupt: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt

    def summary(self) -> str:
        if self.ok:
            return f"{len(self.checked)} WAL segments present and matching their checksums"
        parts = []
        if self.missing:
            more = " ..." if len(self.missing) > 20 else ""
            parts.append(f"missing: {', '.join(self.missing[:20])}{more}")
        if self.corrupt:
            shown = list(self.corrupt.items())[:20]
            parts.append("corrupt: " + "; ".join(f"{n} ({why})" for n, why in shown))
        return f"the WAL archive cannot serve {len(self.checked)} segments: " + " | ".join(parts)


def _folder(name: str) -> str:
    base = name.removesuffix(PARTIAL_SUFFIX)
    if is_history_name(base):
        return f"{WAL_DIR}/history"
    if is_segment_name(base):
        return f"{WAL_DIR}/{base[:8]}"
    raise WalNameError(f"{name!r} is not a WAL segment, partial segment or history file name")


def data_key(name: str) -> str:
    """The object holding WAL file ``name`` (``<segment>``, ``<segment>.partial`` or a history file)."""
    return f"{_folder(name)}/{name}.zst"


def record_key(name: str) -> str:
    return f"{_folder(name)}/{name}.json"


def ship_file(storage: Storage, path: Path, *, name: str | None = None, level: int = 3) -> SegmentRecord:
    """Compress the WAL file at ``path`` into the archive and write its record last.

    Args:
        storage: the archive's storage.
        path: a segment, a ``.partial`` segment or a history file in the spool directory.
        name: the name to store it under (defaults to the file's name).
        level: zstd level.

    Returns:
        The record written.
    """
    name = name or path.name
    raw = path.read_bytes()
    packed = zstandard.ZstdCompressor(level=level).compress(raw)
    record = SegmentRecord(
        name=name,
        partial=name.endswith(PARTIAL_SUFFIX),
        size_bytes=len(packed),
        sha256=hashlib.sha256(packed).hexdigest(),
        raw_size_bytes=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
        shipped_at=datetime.now(UTC),
    )
    storage.put_bytes(data_key(name), packed)
    storage.put_bytes(record_key(name), record.model_dump_json().encode())
    return record


def read_record(storage: Storage, name: str) -> SegmentRecord:
    """The record of ``name``.

    Raises:
        SegmentMissing: no record (never shipped, or its ship did not finish).
    """
    try:
        return SegmentRecord.model_validate_json(storage.get_bytes(record_key(name)))
    except ObjectNotFound:
        raise SegmentMissing(f"WAL file {name} is not in the archive ({storage.location})") from None


def fetch(storage: Storage, name: str) -> bytes:
    """The original bytes of WAL file ``name``, checked against its record before and after unpacking.

    Raises:
        SegmentMissing: not archived.
        SegmentCorrupt: the stored object or its content does not match the record.
    """
    record = read_record(storage, name)
    try:
        packed = storage.get_bytes(data_key(name))
    except ObjectNotFound:
        raise SegmentCorrupt(f"WAL file {name}: its record exists but its data object is missing") from None
    if len(packed) != record.size_bytes or hashlib.sha256(packed).hexdigest() != record.sha256:
        raise SegmentCorrupt(
            f"WAL file {name} is corrupt: the stored object ({len(packed)} bytes) does not match the sha256"
            f" and size in its record ({record.size_bytes} bytes); recovery cannot pass it"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=max(record.raw_size_bytes, 1))
    except zstandard.ZstdError as exc:
        raise SegmentCorrupt(f"WAL file {name} does not decompress: {exc}") from None
    if len(raw) != record.raw_size_bytes or hashlib.sha256(raw).hexdigest() != record.raw_sha256:
        raise SegmentCorrupt(f"WAL file {name}: the unpacked content does not match its record")
    return raw


def verify(storage: Storage, name: str) -> None:
    """Check one archived WAL file end to end (see :func:`fetch`)."""
    fetch(storage, name)


def list_archive(storage: Storage) -> ArchiveListing:
    """Every finished record in the archive, by WAL file name."""
    segments: dict[str, ObjectInfo] = {}
    partials: dict[str, ObjectInfo] = {}
    histories: dict[str, ObjectInfo] = {}
    for item in storage.list(WAL_DIR):
        file = item.key.rsplit("/", 1)[-1]
        if not file.endswith(".json"):
            continue
        name = file.removesuffix(".json")
        if is_segment_name(name):
            segments[name] = item
        elif name.endswith(PARTIAL_SUFFIX) and is_segment_name(name.removesuffix(PARTIAL_SUFFIX)):
            partials[name.removesuffix(PARTIAL_SUFFIX)] = item
        elif is_history_name(name):
            histories[name] = item
    return ArchiveListing(segments, partials, histories)


def check_segments(storage: Storage, names: list[str], *, read: bool = True) -> ArchiveCheck:
    """Whether every segment in ``names`` can be served: present (a finished segment, or a partial for
    the last one) and, with ``read``, matching its checksums.

    Returns:
        The missing and corrupt names, in order.
    """
    listing = list_archive(storage)
    missing: list[str] = []
    corrupt: dict[str, str] = {}
    for index, name in enumerate(names):
        stored = name
        if name not in listing.segments:
            # Only the newest segment may still be in progress (shipped as .partial).
            if index == len(names) - 1 and name in listing.partials:
                stored = name + PARTIAL_SUFFIX
            else:
                missing.append(name)
                continue
        if read:
            try:
                fetch(storage, stored)
            except (SegmentCorrupt, SegmentMissing) as exc:
                corrupt[name] = str(exc)
    return ArchiveCheck(list(names), missing, corrupt)


def segment_size(storage: Storage, listing: ArchiveListing) -> int | None:
    """The cluster's segment size, as the newest finished segment's unpacked size (None: none yet)."""
    if not listing.segments:
        return None
    return read_record(storage, max(listing.segments)).raw_size_bytes


def gaps(listing: ArchiveListing, segment_size: int) -> list[str]:
    """Segments missing inside the archived range of each timeline."""
    return missing_segments(list(listing.segments), segment_size)


def delete_before(storage: Storage, first_kept: str, *, confirm: bool = False) -> list[str]:
    """Remove the finished segments (record first, then data) older than ``first_kept`` on its
    timeline and on earlier timelines, with their partials and the partials of segments that were
    never finished (named ``<segment>.partial`` in the result). Without ``confirm`` only returns what
    would go. History files stay: they are a few bytes each, and the plan reads the timelines' switch
    points from them.

    The one deleting function of the archive; retention computes ``first_kept`` from the oldest kept
    base backup, so WAL that backup needs is never selected.
    """
    if not is_segment_name(first_kept):
        raise WalNameError(f"{first_kept!r} is not a WAL segment name")
    listing = list_archive(storage)

    def older(name: str) -> bool:
        # Fixed-width hex: on one timeline the names sort in WAL order, whatever the segment size.
        return name[:8] < first_kept[:8] or (name[:8] == first_kept[:8] and name[8:] < first_kept[8:])

    doomed = [name for name in sorted(listing.segments) if older(name)]
    # A partial whose segment was never finished: where a timeline ended (a promotion switched to the
    # next one in that segment), or the archiver's last one before it stopped for good.
    orphans = [
        name + PARTIAL_SUFFIX for name in sorted(listing.partials) if older(name) and name not in doomed
    ]
    if confirm:
        for name in doomed:
            storage.delete(record_key(name))
            storage.delete(data_key(name))
            storage.delete(record_key(name + PARTIAL_SUFFIX))
            storage.delete(data_key(name + PARTIAL_SUFFIX))
        for name in orphans:
            storage.delete(record_key(name))
            storage.delete(data_key(name))
    return sorted(doomed + orphans)
