"""The storage interface: the :class:`Storage` protocol every backend implements, its records and
errors, and :func:`update_object`, the read-modify-write over any backend."""

from __future__ import annotations

import builtins
import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from tasks.errors import OpsError

READ_CHUNK = 1 << 20


class StorageError(OpsError):
    """The storage backend refused or failed an operation."""


class ObjectNotFound(StorageError):
    """The object does not exist in the storage."""


class StorageCredentialsError(StorageError):
    """No usable credentials for the S3 storage (a setting to fix, not a network problem)."""


class WriteConflict(StorageError):
    """A conditional write found the object changed (or already there) since it was read."""


@dataclass(frozen=True)
class VersionedBytes:
    """An object's bytes and the version they were read at (an S3 ETag, a local content digest)."""

    data: bytes
    version: str


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object."""

    key: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class UnfinishedObject:
    """A write that never completed: a ``.partial`` file or an incomplete S3 multipart upload."""

    key: str
    started: datetime
    handle: str
    size: int | None = None


class ObjectWriter(Protocol):
    """A streaming write; ``open_write`` commits it on success and aborts it on error."""

    def write(self, data: bytes) -> int: ...


class Storage(Protocol):
    """The storage interface the backup code uses."""

    @property
    def location(self) -> str:
        """Where objects go, for reports (no secrets)."""
        ...

    def open_write(self, key: str) -> contextlib.AbstractContextManager[ObjectWriter]: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def get_versioned(self, key: str) -> VersionedBytes:
        """The object's bytes and their version, for a later :meth:`put_if_version`.

        Raises:
            ObjectNotFound: no such object.
        """
        ...

    def put_if_version(self, key: str, data: bytes, version: str | None) -> str:
        """Write ``data`` only if the object is still at ``version`` (``None``: only if it does not exist).

        Returns:
            The new version.

        Raises:
            WriteConflict: the object changed (or exists) since that version was read; nothing written.
            ObjectNotFound: a version was given and the object no longer exists; nothing written.
        """
        ...

    def iter_chunks(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]: ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def delete(self, key: str) -> bool: ...

    def list_unfinished(self, prefix: str) -> builtins.list[UnfinishedObject]: ...

    def discard_unfinished(self, item: UnfinishedObject) -> None: ...


def check_key(key: str) -> str:
    """``key`` when it is a relative object key; a StorageError otherwise (an absolute path, ``..``)."""
    if not key or key.startswith("/") or ".." in key.split("/") or "\\" in key:
        raise StorageError(f"invalid object key {key!r}: use relative keys such as 'data/x.dump.zst'")
    return key


def update_object(
    storage: Storage, key: str, change: Callable[[bytes], bytes], *, attempts: int = 20
) -> bytes:
    """Read-modify-write one object so that concurrent updates all land.

    ``change`` gets the current bytes and returns the new ones; the write is conditional on the version
    read, and on a conflict the object is read again and ``change`` applied again (after a short,
    growing, random pause).

    Returns:
        The bytes written.

    Raises:
        WriteConflict: the object changed under every one of ``attempts`` tries.
        ObjectNotFound: the object does not exist (or was deleted meanwhile).
    """
    jitter = random.SystemRandom()
    for attempt in range(attempts):
        current = storage.get_versioned(key)
        new = change(current.data)
        try:
            storage.put_if_version(key, new, current.version)
        except WriteConflict:
            time.sleep(jitter.uniform(0, min(1.0, 0.01 * 2**attempt)))
            continue
        return new
    raise WriteConflict(
        f"{key} in {storage.location} changed under each of {attempts} attempts to update it; nothing"
        " was written, run the update again"
    )
