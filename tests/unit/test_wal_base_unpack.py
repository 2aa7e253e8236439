"""Unpacking a base backup: the files come out whole through tar, and a missing, truncated or altered
object, or a member aiming outside the directory, never passes for a good one."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard

from tasks.backup import BackupCorrupt
from tasks.settings import load_settings
from tasks.storage import Storage, open_storage
from tasks.wal.base import BaseBackupManifest, extract_base_backup


def _tar(members: dict[str, bytes], *, evil: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
        if evil is not None:
            info = tarfile.TarInfo(evil)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return buffer.getvalue()


def _stored(storage: Storage, raw: bytes, *, stored: bytes | None = None) -> BaseBackupManifest:
    packed = zstandard.ZstdCompressor().compress(raw) if stored is None else stored
    storage.put_bytes("base/data/b1.tar.zst", packed)
    now = datetime.now(UTC)
    return BaseBackupManifest(
        id="b1",
        started_at=now,
        finished_at=now,
        size_bytes=len(packed),
        raw_size_bytes=len(raw),
        sha256=hashlib.sha256(packed).hexdigest(),
        data_key="base/data/b1.tar.zst",
        tool_version="pg_basebackup (PostgreSQL) 15",
        server_version="15",
        timeline=1,
        start_lsn="0/2000028",
        stop_lsn="0/2000100",
        wal_segment_size=16 << 20,
    )


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return open_storage(load_settings(storage={"url": f"file://{tmp_path / 'store'}"}).storage)


FILES = {
    "PG_VERSION": b"15\n",
    "global/pg_control": os.urandom(8192),
    "base/5/16384": os.urandom(3 << 20),
    "base/5/16384_fsm": b"",
}


def test_files_come_out_whole(storage: Storage, tmp_path: Path) -> None:
    manifest = _stored(storage, _tar(FILES))
    extract_base_backup(storage, manifest, tmp_path / "data")
    for name, data in FILES.items():
        assert (tmp_path / "data" / name).read_bytes() == data


def test_missing_truncated_or_altered_objects_are_refused(storage: Storage, tmp_path: Path) -> None:
    raw = _tar(FILES)
    packed = zstandard.ZstdCompressor().compress(raw)
    manifest = _stored(storage, raw)
    storage.put_bytes(manifest.data_key, packed[: len(packed) // 2])
    with pytest.raises(BackupCorrupt, match=r"truncated|does not unpack"):
        extract_base_backup(storage, manifest, tmp_path / "a")
    altered = bytearray(packed)
    altered[len(altered) // 2] ^= 0xFF
    storage.put_bytes(manifest.data_key, bytes(altered))
    with pytest.raises(BackupCorrupt):
        extract_base_backup(storage, manifest, tmp_path / "b")
    # Same length, valid zstd and tar, other content: only the checksum can tell.
    other = dict(FILES, PG_VERSION=b"16\n")
    storage.put_bytes(manifest.data_key, zstandard.ZstdCompressor().compress(_tar(other)))
    with pytest.raises(BackupCorrupt, match="altered"):
        extract_base_backup(storage, manifest, tmp_path / "c")
    storage.delete(manifest.data_key)
    with pytest.raises(BackupCorrupt, match="missing"):
        extract_base_backup(storage, manifest, tmp_path / "d")


def test_a_member_cannot_land_outside_the_directory(storage: Storage, tmp_path: Path) -> None:
    manifest = _stored(storage, _tar(FILES, evil="../outside"))
    # Refusing the whole archive is as good as skipping the member.
    with contextlib.suppress(BackupCorrupt):
        extract_base_backup(storage, manifest, tmp_path / "data")
    assert not (tmp_path / "outside").exists()
    assert (tmp_path / "data" / "PG_VERSION").read_bytes() == b"15\n"
