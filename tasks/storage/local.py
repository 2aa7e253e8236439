"""The local directory backend (``file://``): a write lands in ``<key>.partial`` and is renamed on
commit; a conditional write holds an ``flock`` on a ``<key>.lock`` sidecar."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.storage.base import (
    READ_CHUNK,
    ObjectInfo,
    ObjectNotFound,
    ObjectWriter,
    StorageError,
    UnfinishedObject,
    VersionedBytes,
    WriteConflict,
    check_key,
)

_PARTIAL_SUFFIX = ".partial"
# The sidecar a local conditional write locks; never listed as an object.
_LOCK_SUFFIX = ".lock"


def _make_parent(path: Path) -> None:
    """Create the directory an object goes in; a StorageError that says so when it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {path.parent}: {exc.strerror}; check the storage url") from None


class LocalStorage:
    """Objects as files under a directory; a write lands in ``<key>.partial`` and is renamed on commit."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def location(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[ObjectWriter]:
        path = self._path(key)
        _make_parent(path)
        partial = path.with_name(path.name + _PARTIAL_SUFFIX)
        handle = partial.open("wb")
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(partial, path)
        except BaseException:
            handle.close()
            partial.unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.open_write(key) as writer:
            writer.write(data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.location}") from None

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``<path>.lock`` (one holder across processes and threads)."""
        lock_path = path.with_name(path.name + _LOCK_SUFFIX)
        _make_parent(path)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A delete removes the sidecar under the lock: a waiter that got the lock of a removed
                # sidecar locks the current one instead.
                try:
                    held = os.fstat(fd)
                    current = os.stat(lock_path)
                    same = (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)
                except FileNotFoundError:
                    same = False
                if same:
                    yield
                    return
            finally:
                os.close(fd)

    def get_versioned(self, key: str) -> VersionedBytes:
        data = self.get_bytes(key)
        return VersionedBytes(data, hashlib.sha256(data).hexdigest())

    def put_if_version(self, key: str, data: bytes, version: str | None) -> str:
        path = self._path(key)
        with self._locked(path):
            # Every conditional writer of this key holds the lock from this read to the rename.
            try:
                current: str | None = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != version:
                if current is None:
                    raise ObjectNotFound(f"{key} no longer exists in {self.location}; nothing was written")
                raise WriteConflict(
                    f"{key} in {self.location} changed since it was read; read it again and retry"
                )
            self.put_bytes(key, data)
        return hashlib.sha256(data).hexdigest()

    def iter_chunks(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        try:
            handle = self._path(key).open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.location}") from None
        with handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.location}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        found = []
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.endswith((_PARTIAL_SUFFIX, _LOCK_SUFFIX)):
                stat = path.stat()
                found.append(
                    ObjectInfo(
                        path.relative_to(self.root).as_posix(),
                        stat.st_size,
                        datetime.fromtimestamp(stat.st_mtime, UTC),
                    )
                )
        return found

    def delete(self, key: str) -> bool:
        path = self._path(key)
        if not path.parent.is_dir():
            return False
        # Under the lock, so a conditional write in progress finishes first and one that follows finds
        # the object gone; the sidecar goes too (a waiter on it re-locks, see _locked).
        with self._locked(path):
            existed = path.is_file()
            path.unlink(missing_ok=True)
            path.with_name(path.name + _LOCK_SUFFIX).unlink(missing_ok=True)
        return existed

    def list_unfinished(self, prefix: str) -> builtins.list[UnfinishedObject]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        found = []
        for path in sorted(base.rglob("*" + _PARTIAL_SUFFIX)):
            stat = path.stat()
            key = path.relative_to(self.root).as_posix().removesuffix(_PARTIAL_SUFFIX)
            found.append(
                UnfinishedObject(key, datetime.fromtimestamp(stat.st_mtime, UTC), str(path), stat.st_size)
            )
        return found

    def discard_unfinished(self, item: UnfinishedObject) -> None:
        Path(item.handle).unlink(missing_ok=True)

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free


def local_root(url: str) -> Path:
    """The directory a ``file://`` URL names (``file://./var/backups`` is relative to the working dir)."""
    parts = urlsplit(url)
    return Path(unquote(parts.netloc + parts.path))
