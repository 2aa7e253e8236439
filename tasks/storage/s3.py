"""The S3 backend (``s3://bucket/prefix``, any S3-compatible endpoint): streamed writes are multipart
uploads, a conditional write is ``If-Match`` on the ETag. boto3 is imported only when one is opened."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from tasks.runlog import run_logger
from tasks.secrets import mask_text
from tasks.settings import StorageSettings
from tasks.storage.base import (
    READ_CHUNK,
    ObjectInfo,
    ObjectNotFound,
    ObjectWriter,
    StorageCredentialsError,
    StorageError,
    UnfinishedObject,
    VersionedBytes,
    WriteConflict,
    check_key,
)


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
        check_key(key)
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
