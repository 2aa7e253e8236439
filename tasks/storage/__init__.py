"""Object storage for backups and evidence: a local directory (``file://``) or S3 (``s3://bucket/prefix``).

One small interface, two backends. Writes are streamed (``open_write`` yields a writer that takes bytes
as they come) and become visible only when committed: the local backend writes ``<key>.partial`` and
renames it, the S3 backend uploads parts of a multipart upload and completes it. A failed or interrupted
write leaves at most an unfinished object (a ``.partial`` file or an incomplete multipart upload) that
:meth:`Storage.list_unfinished` finds and :meth:`Storage.discard_unfinished` removes.

Small records that several runs update (backup manifests) are changed with a conditional write:
:meth:`Storage.get_versioned` returns the bytes and an opaque version, :meth:`Storage.put_if_version`
writes only if the object is still at that version (S3: ``If-Match`` on the ETag; local files: an
``flock`` on a ``<key>.lock`` sidecar, a re-read and a rename), and :func:`update_object` retries the
read-modify-write on a conflict, so concurrent updates all land.

boto3 is imported only when an S3 storage is opened.

The interface is in :mod:`~tasks.storage.base`, the backends in :mod:`~tasks.storage.local` and
:mod:`~tasks.storage.s3`; import from ``tasks.storage``: every public name is here.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tasks.settings import StorageSettings
from tasks.storage.base import (
    READ_CHUNK,
    ObjectInfo,
    ObjectNotFound,
    ObjectWriter,
    Storage,
    StorageCredentialsError,
    StorageError,
    UnfinishedObject,
    VersionedBytes,
    WriteConflict,
    update_object,
)
from tasks.storage.local import LocalStorage, local_root
from tasks.storage.s3 import S3Storage

__all__ = [
    "READ_CHUNK",
    "LocalStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectWriter",
    "S3Storage",
    "Storage",
    "StorageCredentialsError",
    "StorageError",
    "UnfinishedObject",
    "VersionedBytes",
    "WriteConflict",
    "local_root",
    "open_storage",
    "update_object",
]


def open_storage(settings: StorageSettings, *, attempts: int = 5) -> Storage:
    """The storage backend the settings name.

    Args:
        settings: the storage section (``url``, endpoint, credentials, part size).
        attempts: attempts per S3 request (bounded retries with backoff) before an upload fails.
    """
    scheme = urlsplit(settings.url).scheme
    if scheme == "file":
        return LocalStorage(local_root(settings.url))
    return S3Storage(settings, attempts=attempts)
