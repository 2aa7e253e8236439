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
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from tasks.errors import OpsError
from tasks.runlog import run_logger
from tasks.secrets import mask_text
from tasks.settings import StorageSettings

READ_CHUNK = 1 << 20
_PARTIAL_SUFFIX = ".partial"
# The sidecar a local conditional write locks; never listed as an object.
_LOCK_SUFFIX = ".lock"


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


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/") or "\\" in key:
        raise StorageError(f"invalid object key {key!r}: use relative keys such as 'data/x.dump.zst'")
    return key


class LocalStorage:
    """Objects as files under a directory; a write lands in ``<key>.partial`` and is renamed on commit."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def location(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[ObjectWriter]:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create {path.parent}: {exc.strerror}; check the storage url"
            ) from None
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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create {path.parent}: {exc.strerror}; check the storage url"
            ) from None
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


class _S3Writer:
    """Buffers up to one part, uploads full parts as they fill, completes (or aborts) the upload."""

    def __init__(self, client: Any, bucket: str, key: str, part_size: int) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._part_size = part_size
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []
        response = client.create_multipart_upload(Bucket=bucket, Key=key)
        self.upload_id: str = response["UploadId"]

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= self._part_size:
            self._upload_part(bytes(self._buffer[: self._part_size]))
            del self._buffer[: self._part_size]
        return len(data)

    def _upload_part(self, body: bytes) -> None:
        number = len(self._parts) + 1
        response = self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self.upload_id, PartNumber=number, Body=body
        )
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def commit(self) -> None:
        if self._buffer or not self._parts:
            self._upload_part(bytes(self._buffer))
            self._buffer.clear()
        self._client.complete_multipart_upload(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": self._parts},
        )

    def abort(self) -> None:
        self._buffer.clear()
        self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self.upload_id)


class S3Storage:
    """Objects in an S3 bucket under a prefix; streamed writes are multipart uploads."""

    def __init__(self, settings: StorageSettings, *, attempts: int = 5) -> None:
        import boto3
        from botocore.config import Config

        parts = urlsplit(settings.url)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.endpoint_url = settings.endpoint_url
        self.part_size = settings.multipart_chunk_mb * 1024 * 1024
        self._secrets = [
            s.get_secret_value()
            for s in (settings.access_key_id, settings.secret_access_key)
            if s is not None
        ]
        config = Config(
            region_name=settings.region,
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            s3={"addressing_style": "path"} if settings.endpoint_url else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id.get_secret_value() if settings.access_key_id else None,
            aws_secret_access_key=(
                settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
            ),
            config=config,
        )

    @property
    def location(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return where + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _error(self, action: str, key: str, exc: Exception) -> StorageError:
        """A clear, secret-free error from a botocore exception."""
        from botocore.exceptions import ClientError

        where = f"{self.location} ({key})" if key else self.location
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            message = str(exc.response.get("Error", {}).get("Message", ""))
            hint = {
                "InvalidAccessKeyId": "the access key is not known: check OPS_STORAGE__ACCESS_KEY_ID",
                "SignatureDoesNotMatch": "the secret key is wrong: check OPS_STORAGE__SECRET_ACCESS_KEY",
                "AccessDenied": "the credentials lack permission for this bucket and prefix",
                "NoSuchBucket": f"bucket {self.bucket!r} does not exist: create it or fix OPS_STORAGE__URL",
                "NoSuchKey": "the object does not exist",
                "404": "the object does not exist",
            }.get(code, "see the S3 error code")
            cls = ObjectNotFound if code in {"NoSuchKey", "404", "NotFound"} else StorageError
            text = f"S3 {action} failed on {where}: {code} {message}; {hint}"
            return cls(mask_text(text, self._secrets))
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            text = (
                f"S3 {action} failed on {where}: no usable credentials ({exc}); set"
                " OPS_STORAGE__ACCESS_KEY_ID and OPS_STORAGE__SECRET_ACCESS_KEY, or give the process an"
                " AWS profile or role"
            )
            return StorageCredentialsError(mask_text(text, self._secrets))
        text = f"S3 {action} failed on {where}: {type(exc).__name__}: {exc}; check the endpoint and network"
        return StorageError(mask_text(text, self._secrets))

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[ObjectWriter]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        try:
            writer = _S3Writer(self._client, self.bucket, full, self.part_size)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("create multipart upload", full, exc) from None
        try:
            yield writer
            writer.commit()
        except BaseException as exc:
            try:
                writer.abort()
                run_logger(__name__).warning(
                    "aborted multipart upload of %s after: %s", full, type(exc).__name__
                )
                aborted = "the multipart upload was aborted"
            except (BotoCoreError, ClientError) as abort_exc:
                aborted = (
                    f"aborting the multipart upload failed too ({type(abort_exc).__name__}); prune-backups"
                    " removes it later"
                )
            if isinstance(exc, BotoCoreError | ClientError):
                error = self._error("upload", full, exc)
                raise type(error)(f"{error}; {aborted}") from None
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("put", full, exc) from None

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def get_versioned(self, key: str) -> VersionedBytes:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            with contextlib.closing(response["Body"]) as body:
                return VersionedBytes(body.read(), str(response["ETag"]))
        except (BotoCoreError, ClientError) as exc:
            raise self._error("get", full, exc) from None

    def put_if_version(self, key: str, data: bytes, version: str | None) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        try:
            response = self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **condition)
        except ClientError as exc:
            # 412 when the ETag moved on; 409 when S3 saw a concurrent conditional write to the key.
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                raise WriteConflict(
                    f"{full} in {self.location} changed since it was read; read it again and retry"
                ) from None
            raise self._error("conditional put", full, exc) from None
        except BotoCoreError as exc:
            raise self._error("conditional put", full, exc) from None
        return str(response["ETag"])

    def iter_chunks(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
            with contextlib.closing(body):
                yield from body.iter_chunks(chunk_size)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("get", full, exc) from None

    def size(self, key: str) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])
        except (BotoCoreError, ClientError) as exc:
            raise self._error("head", full, exc) from None

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> list[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        found = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                for item in page.get("Contents", []):
                    found.append(
                        ObjectInfo(self._relative(item["Key"]), int(item["Size"]), item["LastModified"])
                    )
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list", full, exc) from None
        return found

    def delete(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        existed = self.exists(key)
        full = self._key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("delete", full, exc) from None
        return existed

    def list_unfinished(self, prefix: str) -> builtins.list[UnfinishedObject]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        found = []
        try:
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for item in page.get("Uploads", []):
                    found.append(
                        UnfinishedObject(self._relative(item["Key"]), item["Initiated"], item["UploadId"])
                    )
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list multipart uploads", full, exc) from None
        return found

    def discard_unfinished(self, item: UnfinishedObject) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(item.key)
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=item.handle)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("abort multipart upload", full, exc) from None


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


def local_root(url: str) -> Path:
    """The directory a ``file://`` URL names (``file://./var/backups`` is relative to the working dir)."""
    parts = urlsplit(url)
    return Path(unquote(parts.netloc + parts.path))


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
