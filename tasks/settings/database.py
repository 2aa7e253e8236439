"""The data services' sections: PostgreSQL, Redis, the job queues, object storage, backups and WAL
archiving."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from tasks.secrets import mask_url
from tasks.settings.base import _ENCODE_HINT, _Section, is_ambiguous_url


class PostgresSettings(_Section):
    """The application's PostgreSQL database."""

    dsn: SecretStr = Field(
        default=SecretStr("postgresql://postgres@127.0.0.1:5432/swagger2mcp"),
        description="libpq URL of the app's database, postgresql://user:password@host:5432/db (secret)",
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, description="timeout of each connection attempt, seconds (rounded, at least 1)"
    )
    statement_timeout_seconds: float = Field(
        default=30.0, gt=0, description="statement_timeout of the tool's ordinary sessions, seconds"
    )

    @field_validator("dsn")
    @classmethod
    def _valid_dsn(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if is_ambiguous_url(raw):
            raise ValueError(_ENCODE_HINT)
        parts = urlsplit(raw)
        if parts.scheme not in {"postgresql", "postgres", "postgresql+psycopg"}:
            raise ValueError("must be a postgresql:// URL (postgresql://user:password@host:5432/dbname)")
        try:
            parts.port  # noqa: B018 - parsing the port validates it
        except ValueError as exc:
            raise ValueError(f"has an invalid port: {exc}") from None
        if not parts.path.strip("/"):
            raise ValueError("names no database (postgresql://user@host:5432/DBNAME)")
        return value

    @property
    def masked_dsn(self) -> str:
        return mask_url(self.dsn.get_secret_value())


class RedisSettings(_Section):
    """The Redis server the BullMQ queues live on."""

    url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="URL of the Redis the queues live on: redis://, rediss:// or unix:// (secret)",
    )
    socket_timeout_seconds: float = Field(
        default=3.0, gt=0, description="connect and read timeout of each Redis call, seconds"
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: SecretStr) -> SecretStr:
        if is_ambiguous_url(value.get_secret_value()):
            raise ValueError(_ENCODE_HINT)
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        try:
            parts.port  # noqa: B018 - parsing the port validates it
        except ValueError as exc:
            raise ValueError(f"has an invalid port: {exc}") from None
        return value

    @property
    def masked_url(self) -> str:
        return mask_url(self.url.get_secret_value())


class QueueSettings(_Section):
    """BullMQ queues of the application (the worker's queues)."""

    names: list[str] = Field(
        default_factory=lambda: ["default"],
        min_length=1,
        description="BullMQ queue names the worker consumes (JSON list)",
    )
    prefix: str = Field(
        default="bull", description="BullMQ key prefix the application uses (keys <prefix>:<queue>:...)"
    )


class StorageSettings(_Section):
    """Where backups, evidence bundles and reports are stored."""

    url: str = Field(
        default="file://./var/backups",
        description="where backups, evidence and plans go: file:///path or s3://bucket/prefix",
        examples=["s3://swagger2mcp-backups/production"],
    )
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, R2, ...), addressed path-style; None: AWS S3",
        examples=["http://127.0.0.1:9000"],
    )
    region: str = Field(default="us-east-1", description="S3 region")
    access_key_id: SecretStr | None = Field(
        default=None, description="S3 access key id; None: boto3's default credentials (secret)"
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key; None: boto3's default credentials (secret)"
    )
    multipart_chunk_mb: int = Field(
        default=16, ge=5, le=512, description="S3 multipart upload part size, MiB"
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "file":
            if not (parts.netloc + parts.path):
                raise ValueError("file:// URL names no directory")
        elif parts.scheme == "s3":
            if not parts.netloc:
                raise ValueError("s3:// URL names no bucket (s3://bucket/prefix)")
        else:
            raise ValueError("must be file:///path or s3://bucket/prefix")
        return value


class BackupSettings(_Section):
    """Database backups: the tools, compression, verification, retention and timeouts."""

    timezone: str = Field(
        default="UTC",
        description="IANA zone whose calendar days, weeks and months the retention tiers use",
        examples=["Europe/Berlin"],
    )
    pg_dump: str = Field(default="pg_dump", description="pg_dump program: a name on PATH or a path")
    pg_restore: str = Field(default="pg_restore", description="pg_restore program: a name on PATH or a path")
    zstd_level: int = Field(default=3, ge=1, le=22, description="zstd compression level of dumps (1-22)")
    zstd_threads: int = Field(
        default=0, ge=0, le=64, description="zstd compression threads; 0: compress on the calling thread"
    )
    content_hashes: bool = Field(
        default=True,
        description="record a per-table content hash with the row counts (one more scan per table)",
    )
    restore_jobs: int = Field(
        default=2, ge=1, le=32, description="pg_restore --jobs for indexes and constraints of a restore"
    )
    restore_data_streams: int | None = Field(
        default=None,
        ge=1,
        le=2,
        description=(
            "readings of the backup loading table data at once (2: the largest table apart);"
            " None: 2 for file:// storage, 1 for S3"
        ),
    )
    spool_dir: Path | None = Field(
        default=None, description="directory of a restore's small scratch files (the catalog); None: TMPDIR"
    )
    maintenance_database: str = Field(
        default="postgres", description="database connected to for CREATE/ALTER/DROP DATABASE"
    )
    keep_last: int = Field(default=7, ge=1, description="retention: the newest N backups are kept")
    keep_daily: int = Field(
        default=7, ge=0, description="retention: the newest backup of each of the last N days"
    )
    keep_weekly: int = Field(
        default=4, ge=0, description="retention: the newest backup of each of the last N ISO weeks"
    )
    keep_monthly: int = Field(
        default=6, ge=0, description="retention: the newest backup of each of the last N months"
    )
    orphan_grace_hours: float = Field(
        default=24.0,
        gt=0,
        description="unfinished backup objects older than this are removed by pruning, hours",
    )
    upload_attempts: int = Field(default=5, ge=1, le=20, description="S3 attempts per request (with backoff)")
    dump_timeout_seconds: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="time limit of one dump (pg_dump and its snapshot queries), seconds",
    )
    restore_timeout_seconds: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="time limit of one restore (pg_restore and its statements), seconds",
    )
    lock_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="how long a restore waits for the database's lock (a migration or restore), seconds",
    )
    approval_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="how long restore-database waits for approval, seconds"
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("is not a known IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
        return value


class WalSettings(_Section):
    """Point-in-time recovery: the WAL archiver, base backups and restores to a moment."""

    replication_dsn: SecretStr | None = Field(
        default=None,
        description=(
            "libpq URL of the replication role the archiver and base backups connect as, e.g."
            " postgresql://replicator:pass@db:5432/postgres (secret); None: the postgres.dsn server and user"
        ),
    )
    slot: str = Field(
        default="swagger2mcp_ops_wal",
        description="physical replication slot the archiver streams from (lower-case letters, digits, _)",
    )
    spool_dir: Path = Field(
        default=Path("./var/wal-spool"),
        description="directory where pg_receivewal writes segments before they are shipped (a volume)",
    )
    pg_receivewal: str = Field(default="pg_receivewal", description="pg_receivewal program: a name or path")
    pg_basebackup: str = Field(default="pg_basebackup", description="pg_basebackup program: a name or path")
    server_bin_dir: Path = Field(
        default=Path("/usr/lib/postgresql/15/bin"),
        description="directory of postgres and pg_controldata for the scratch recovery instance (same major)",
    )
    zstd_level: int = Field(default=3, ge=1, le=22, description="zstd level of WAL segments and base backups")
    poll_seconds: float = Field(
        default=0.5, gt=0, le=60, description="how often the archiver looks for finished segments, seconds"
    )
    partial_ship_seconds: float = Field(
        default=2.0,
        ge=0,
        description="ship the growing (.partial) segment this often when changed, seconds (the RPO is about"
        " half of it plus the ship; each ship is two storage writes); 0: on exit only",
    )
    status_interval_seconds: int = Field(
        default=5, ge=1, le=3600, description="pg_receivewal's status packets to the server, seconds"
    )
    restart_delay_seconds: float = Field(
        default=5.0, gt=0, description="wait before restarting pg_receivewal after it stopped, seconds"
    )
    rpo_warn_seconds: float = Field(
        default=300.0,
        gt=0,
        description="archive age (RPO) above which health reports the archive degraded and"
        " swagger2mcp-ops.wal.rpo-exceeded is emitted (once, then daily while it lasts), seconds",
    )
    slot_lag_warn_bytes: int = Field(
        default=1 << 30,
        gt=0,
        description="WAL the slot holds back on the server above which health warns, bytes",
    )
    keep_base_backups: int = Field(
        default=2,
        ge=1,
        description="base backups kept; WAL older than the oldest kept one's start is removed by pruning",
    )
    basebackup_timeout_seconds: float = Field(
        default=6 * 3600.0, gt=0, description="time limit of one base backup, seconds"
    )
    recovery_timeout_seconds: float = Field(
        default=6 * 3600.0, gt=0, description="time limit of replaying WAL in the scratch instance, seconds"
    )
    scratch_dir: Path | None = Field(
        default=None,
        description="where a restore to a point unpacks its scratch data directory (room for the whole"
        " cluster); None: TMPDIR",
    )
    server_os_user: str = Field(
        default="postgres",
        description="OS user that runs the scratch PostgreSQL when the tool runs as root (root cannot)",
    )

    @field_validator("slot")
    @classmethod
    def _valid_slot(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", value):
            raise ValueError("must be 1-63 lower-case letters, digits or underscores")
        return value

    @field_validator("replication_dsn")
    @classmethod
    def _valid_replication_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        raw = value.get_secret_value()
        if is_ambiguous_url(raw):
            raise ValueError(_ENCODE_HINT)
        if urlsplit(raw).scheme not in {"postgresql", "postgres"}:
            raise ValueError(
                "must be a postgresql:// URL (postgresql://replicator:password@host:5432/postgres)"
            )
        return value
