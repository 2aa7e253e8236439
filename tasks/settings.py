"""The one typed settings model of swagger2mcp-ops.

Sources, highest priority first:

1. environment variables with the prefix ``OPS_`` and ``__`` between nested names
   (``OPS_POSTGRES__DSN``, ``OPS_QUEUE__NAMES='["default","emails"]'``);
2. a TOML file named by ``OPS_CONFIG`` (default: ``ops.toml`` in the working directory when present);
3. the embedded defaults, which serve a local machine with no file at all: PostgreSQL and Redis on
   localhost, backups under ``./var/backups``, runtime ``none``; the state every worker shares (release
   records, Compose image pins) under ``runtime.state_dir``, the checkout's ``var/`` made absolute at
   load. A relative state path given by the operator is refused (it would differ per working directory).

Settings are loaded once per flow run with :func:`load_settings`. A bad value fails at load with a
:class:`SettingsError` that names the field, the bad value (masked when secret) and where it came from,
before any flow does anything. Per-run intent (dry_run, older_than_days, image_tag, ...) is a flow
parameter, never a setting.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from tasks.errors import SettingsError
from tasks.secrets import mask_url

ENV_PREFIX = "OPS_"
CONFIG_ENV = "OPS_CONFIG"
DEFAULT_CONFIG_FILE = "ops.toml"
# The checkout's own var/ directory, absolute: `make run` from a checkout keeps its state where it
# always was, and a run started from another working directory finds the same release history.
DEFAULT_STATE_DIR = Path(__file__).resolve().parent.parent / "var"


def _absolute_state_path(value: Path | None) -> Path | None:
    """Shared state must not depend on a worker's working directory: a relative path is refused."""
    if value is not None and not value.is_absolute():
        raise ValueError(
            "must be an absolute path: it holds state every worker shares (release history, image pins),"
            " and a relative path would point somewhere else for each working directory; give e.g."
            " /var/lib/swagger2mcp-ops (a directory every worker mounts at the same path)"
        )
    return value


_ENCODE_HINT = (
    "does not parse unambiguously: percent-encode special characters in the user name and password"
    " (@ as %40, / as %2F, # as %23, ? as %3F, : in the user name as %3A),"
    " e.g. postgresql://app:pass%40word@db:5432/app"
)


def is_ambiguous_url(raw: str) -> bool:
    """Whether ``raw`` reads differently to different URL parsers (an unencoded ``@``, ``/``, ``#`` or
    ``?`` in the user name or password): libpq and Python's urlsplit would then disagree about the host,
    and the password's tail would show up as a host name in errors."""
    _, sep, rest = raw.partition("://")
    if not sep:
        return False
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    return authority.count("@") > 1 or "@" in tail


class _Section(BaseModel):
    """Base of every settings section: frozen, and unknown keys are errors (a typo must not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


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
        default=5.0,
        ge=0,
        description="ship the growing (.partial) segment this often when changed, seconds; 0: on exit only",
    )
    status_interval_seconds: int = Field(
        default=5, ge=1, le=3600, description="pg_receivewal's status packets to the server, seconds"
    )
    restart_delay_seconds: float = Field(
        default=5.0, gt=0, description="wait before restarting pg_receivewal after it stopped, seconds"
    )
    rpo_warn_seconds: float = Field(
        default=300.0, gt=0, description="archive age (RPO) above which health reports the archive, seconds"
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


class UploadsSettings(_Section):
    """The application's uploads directory."""

    root: Path = Field(
        default=Path("./var/uploads"),
        description=(
            "the application's uploads directory; never /, a system directory or its ancestor, the home or"
            " project directory, a symlink, or one holding the quarantine, backups or plans"
        ),
    )
    expected_owner: str | None = Field(
        default=None,
        description="user (name or uid) that must own the uploads root; cleanup and restore refuse any other",
        examples=["node"],
    )
    expected_mode: str | None = Field(
        default=None,
        description="octal mode the uploads root must have; a mismatch is reported",
        examples=["0755"],
    )
    protect: list[str] = Field(
        default_factory=lambda: [".gitkeep", "keep/**"],
        description=(
            "patterns cleanup never removes (JSON list): a name alone matches at any depth, one with '/'"
            " the root-relative path; '**' crosses directories"
        ),
        examples=[[".gitkeep", "keep/**", "avatars/default.png"]],
    )
    reference_query: str | None = Field(
        default=None,
        description=(
            "read-only SQL whose first column lists the uploads the app still references, which are kept"
            " (an index on it is used); None: no database check"
        ),
        examples=["SELECT path FROM uploads"],
    )
    reference_prefix: str | None = Field(
        default=None,
        description=(
            "what the app stores before the root-relative path, e.g. 'uploads/'; a stored value matches"
            " as path or prefix + path"
        ),
        examples=["uploads/"],
    )
    quarantine_dir: Path | None = Field(
        default=None,
        description="quarantine directory (on the root's filesystem); None: <root>/../.uploads-quarantine",
    )
    quarantine_retention_days: int = Field(
        default=14,
        ge=1,
        description="days quarantine runs and plans are kept before they are purged (at least 1)",
    )
    cross_filesystem: bool = Field(
        default=False, description="also scan directories mounted from another filesystem below the root"
    )
    plan_dir: Path | None = Field(
        default=None,
        description="plan directory (JSON Lines); None: uploads-plans in file storage, else in state_dir",
    )

    @field_validator("expected_mode")
    @classmethod
    def _octal_mode(cls, value: str | None) -> str | None:
        if value is not None and not (value.isdigit() and set(value) <= set("01234567") and len(value) <= 4):
            raise ValueError("must be an octal mode such as '0755' or '2775'")
        return value


class ComposeRuntimeSettings(_Section):
    """The Docker Compose project the services run in (``runtime.kind = "compose"``)."""

    project: str | None = Field(default=None, description="Compose project name; default: the stack name")
    files: list[Path] = Field(
        default_factory=lambda: [Path("docker-compose.yml")],
        min_length=1,
        description="Compose files, passed in order with --file (JSON list)",
        examples=[["docker-compose.yml", "docker-compose.production.yml"]],
    )
    env_file: Path | None = Field(
        default=None,
        description="Compose --env-file; also security-incident's default file of the app secrets",
    )
    project_directory: Path | None = Field(
        default=None, description="Compose --project-directory; None: the first Compose file's directory"
    )
    command: list[str] = Field(
        default_factory=lambda: ["docker", "compose"],
        min_length=1,
        description="the Compose v2 CLI (JSON list)",
    )
    docker_host: str | None = Field(default=None, description="DOCKER_HOST; default: the environment's")
    docker_config: Path | None = Field(default=None, description="DOCKER_CONFIG (where cli-plugins live)")
    images_file: Path | None = Field(
        default=None,
        description=(
            "Compose override file that pins each service's image (absolute); default beside the release"
            " records"
        ),
    )
    pull: Literal["missing", "never", "always"] = Field(
        default="missing", description="image pull policy of a deploy: `missing`, `never` or `always`"
    )
    stop_timeout_seconds: int = Field(
        default=10, ge=0, le=600, description="grace a container gets to stop on restart, seconds"
    )
    command_timeout_seconds: float = Field(
        default=300.0, gt=0, description="time limit of each docker compose command, seconds"
    )

    _absolute_images_file = field_validator("images_file")(_absolute_state_path)


class KubernetesRuntimeSettings(_Section):
    """The Kubernetes namespace the services run in as Deployments (``runtime.kind = "kubernetes"``)."""

    namespace: str = Field(default="swagger2mcp", description="namespace of the application's Deployments")
    kubeconfig: Path | None = Field(
        default=None, description="kubeconfig file; None: in-cluster config, then ~/.kube/config"
    )
    context: str | None = Field(default=None, description="kubeconfig context; None: its current context")
    api_url: str | None = Field(
        default=None,
        description="API server URL; overrides the kubeconfig's",
        examples=["https://10.0.0.1:6443"],
    )
    token: SecretStr | None = Field(default=None, description="bearer token for the API server (secret)")
    verify_ssl: bool = Field(default=True, description="verify the API server's TLS certificate")
    request_timeout_seconds: float = Field(
        default=30.0, gt=0, description="timeout of each API request, seconds"
    )


class RuntimeSettings(_Section):
    """Where the application's services run, and how releases of them are recorded."""

    kind: Literal["compose", "kubernetes", "none"] = Field(
        default="none", description="where the services run: `compose`, `kubernetes` or `none` (not managed)"
    )
    services: list[str] = Field(
        default_factory=lambda: ["backend", "worker"],
        description="the application's Compose services or Deployments (JSON list)",
    )
    environment: str = Field(
        default="staging",
        description="the environment these settings point at, e.g. `staging` or `production`",
    )
    compose: ComposeRuntimeSettings = Field(default_factory=ComposeRuntimeSettings)
    kubernetes: KubernetesRuntimeSettings = Field(default_factory=KubernetesRuntimeSettings)
    state_dir: Path = Field(
        default=DEFAULT_STATE_DIR,
        description=(
            "absolute directory of the state every worker shares (release records, Compose image pins);"
            " default: the checkout's var/ directory. With several workers, a directory each of them"
            " mounts at the same path"
        ),
    )
    release_store: Path | None = Field(
        default=None,
        description="absolute directory of the durable release records; None: <state_dir>/releases",
    )
    migration_query: str | None = Field(
        default=None,
        description="SQL returning the applied migration revision when there is no alembic_version table",
        examples=["SELECT name FROM knex_migrations ORDER BY id DESC LIMIT 1"],
    )
    ready_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="how long a deploy, rollback or restart waits for ready services, seconds",
    )
    poll_interval_seconds: float = Field(
        default=2.0, gt=0, le=60, description="interval between readiness polls, seconds"
    )
    smoke_urls: list[str] = Field(
        default_factory=list,
        description="HTTP URLs that must answer 2xx after a deploy, rollback or restart (JSON list)",
        examples=[["https://api.example.com/api/specs"]],
    )
    lock_timeout_seconds: float = Field(
        default=0.0,
        ge=0,
        description=(
            "how long a deploy, rollback, uploads cleanup, FLUSHDB or secret rotation waits for another"
            " run of the same target before refusing (naming it), seconds; 0: refuse at once"
        ),
    )

    _absolute_state = field_validator("state_dir", "release_store")(_absolute_state_path)

    @field_validator("smoke_urls")
    @classmethod
    def _valid_smoke_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if urlsplit(url).scheme not in {"http", "https"}:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value

    @property
    def releases_dir(self) -> Path:
        """Where the release records (and by default the Compose image pins) live."""
        return self.release_store or self.state_dir / "releases"


class HealthSettings(_Section):
    """The health check: endpoints, timeouts and the thresholds that make a check degraded."""

    urls: list[str] = Field(
        default_factory=list,
        description="the app's own HTTP health endpoints (JSON list of http(s) URLs)",
        examples=[["http://127.0.0.1:3000/health"]],
    )
    timeout_seconds: float = Field(
        default=5.0, gt=0, le=120, description="HTTP probe timeout, seconds; each check's deadline is 2x + 1"
    )
    postgres_latency_warn_ms: float = Field(
        default=250.0, gt=0, description="PostgreSQL SELECT 1 latency above which it is degraded, ms"
    )
    redis_latency_warn_ms: float = Field(
        default=100.0, gt=0, description="Redis PING latency above which it is degraded, ms"
    )
    http_latency_warn_ms: float = Field(
        default=1000.0, gt=0, description="HTTP endpoint latency above which it is degraded, ms"
    )
    connections_warn_ratio: float = Field(
        default=0.8, gt=0, le=1, description="share of max_connections in use at which PostgreSQL is degraded"
    )
    redis_memory_warn_ratio: float = Field(
        default=0.9, gt=0, le=1, description="share of maxmemory used at which Redis is degraded"
    )
    failed_jobs_warn: int = Field(
        default=100, ge=0, description="failed jobs (all queues) above which the queue check is degraded"
    )
    waiting_jobs_warn: int = Field(
        default=1000, ge=0, description="waiting jobs (all queues) above which the queue check is degraded"
    )

    @field_validator("urls")
    @classmethod
    def _valid_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if urlsplit(url).scheme not in {"http", "https"}:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value


class DiagnoseSettings(_Section):
    """The diagnose flow: thresholds that make a finding a warning or critical, and what else to look at."""

    long_query_seconds: float = Field(
        default=5.0, gt=0, description="queries running longer are reported, seconds"
    )
    slow_statement_mean_ms: float = Field(
        default=1000.0,
        gt=0,
        description="pg_stat_statements entries with a higher mean time are findings, ms",
    )
    top_statements: int = Field(
        default=10, ge=1, le=100, description="pg_stat_statements entries shown, slowest mean time first"
    )
    connections_warn_ratio: float = Field(
        default=0.8, gt=0, le=1, description="share of max_connections in use that is a warning"
    )
    connections_critical_ratio: float = Field(
        default=0.95, gt=0, le=1, description="share of max_connections in use that is critical"
    )
    idle_in_transaction_warn_seconds: float = Field(
        default=60.0, gt=0, description="sessions idle in transaction this long are a warning, seconds"
    )
    redis_memory_warn_ratio: float = Field(
        default=0.8, gt=0, le=1, description="share of Redis maxmemory used that is a warning"
    )
    redis_memory_critical_ratio: float = Field(
        default=0.95, gt=0, le=1, description="share of Redis maxmemory used that is critical"
    )
    redis_fragmentation_warn: float = Field(
        default=1.5, gt=1, description="Redis memory fragmentation ratio that is a warning (above 10 MB used)"
    )
    failed_jobs_shown: int = Field(
        default=10, ge=0, le=1000, description="newest failed jobs shown per queue, with their reasons"
    )
    waiting_jobs_warn: int = Field(
        default=1000, ge=0, description="waiting jobs in one queue above which it is a warning"
    )
    log_tail_lines: int = Field(
        default=100, ge=0, le=10000, description="log lines read per service; 0: no logs"
    )
    log_patterns: list[str] = Field(
        default_factory=lambda: [
            r"(?i)\berror\b",
            r"(?i)out of memory|heap|\boom\b",
            r"ECONNREFUSED|ETIMEDOUT",
        ],
        description="regular expressions whose matching lines in the log tails are counted and shown",
        examples=[[r"(?i)\berror\b", "ECONNREFUSED|ETIMEDOUT", "Cannot save file"]],
    )
    restarts_warn: int = Field(
        default=3, ge=1, description="container restarts of a service that are a warning"
    )
    cpu_warn_percent: float = Field(
        default=90.0, gt=0, description="CPU use of a service that is a warning, percent of one core"
    )
    disk_paths: list[Path] = Field(
        default_factory=list,
        description="more paths whose filesystems are checked (the uploads root and file storage always are)",
        examples=[["/var/lib/docker"]],
    )
    disk_free_warn_ratio: float = Field(
        default=0.15, gt=0, lt=1, description="free share of a filesystem at or below which it is a warning"
    )
    disk_free_critical_ratio: float = Field(
        default=0.05, gt=0, lt=1, description="free share of a filesystem at or below which it is critical"
    )
    resolve_hosts: list[str] = Field(
        default_factory=list,
        description="more host names to resolve (PostgreSQL's, Redis's and the health URLs' always are)",
        examples=[["api.example.com"]],
    )
    network_timeout_seconds: float = Field(
        default=3.0, gt=0, le=60, description="timeout of each TCP connect and DNS lookup, seconds"
    )
    check_deadline_seconds: float = Field(
        default=30.0, gt=0, le=600, description="hard deadline of each diagnostic check, seconds"
    )
    http_samples: int = Field(
        default=5,
        ge=1,
        le=50,
        description="requests timed per endpoint (health.urls and runtime.smoke_urls): median and worst",
    )
    http_slow_ms: float = Field(
        default=1000.0,
        gt=0,
        description="response time above which an endpoint is slow (the runbook's 1 second), ms",
    )
    http_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="time limit of each timed request, seconds"
    )
    expected_upload_mb: float = Field(
        default=10.0,
        gt=0,
        description="largest upload the app must accept, MiB: a lower limit on the request path is a finding",
    )
    nginx_config_argv: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "command printing the reverse proxy's loaded configuration, `nginx -T` (JSON list);"
            " None: not read"
        ),
        examples=[["docker", "exec", "proxy", "nginx", "-T"]],
    )
    nginx_config_timeout_seconds: float = Field(
        default=20.0, gt=0, le=300, description="time limit of the nginx configuration command, seconds"
    )
    nginx_server_names: list[str] = Field(
        default_factory=list,
        description="server_name of the app's nginx server blocks (JSON list); empty: every server block",
        examples=[["api.example.com"]],
    )
    ingress_default_body_size: str = Field(
        default="1m",
        pattern=r"^[0-9]+[kKmMgG]?$",
        description=(
            "upload limit of an nginx Ingress without the proxy-body-size annotation: the ingress-nginx"
            " ConfigMap's proxy-body-size (its own default is 1m)"
        ),
    )
    backend_upload_limit_mb: float | None = Field(
        default=None,
        gt=0,
        description="the backend's own upload limit (e.g. Multer's limits.fileSize), MiB; None: not known",
    )

    @field_validator("log_patterns")
    @classmethod
    def _valid_patterns(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> DiagnoseSettings:
        if self.connections_critical_ratio < self.connections_warn_ratio:
            raise ValueError("connections_critical_ratio must not be below connections_warn_ratio")
        if self.redis_memory_critical_ratio < self.redis_memory_warn_ratio:
            raise ValueError("redis_memory_critical_ratio must not be below redis_memory_warn_ratio")
        if self.disk_free_critical_ratio > self.disk_free_warn_ratio:
            raise ValueError("disk_free_critical_ratio must not be above disk_free_warn_ratio")
        return self


class MigrationsSettings(_Section):
    """Schema migrations: the tool (Alembic in-process or any migration CLI), smoke queries, the lock,
    timeouts, and the application's maintenance mode used by the scheduled-downtime flow."""

    tool: Literal["alembic", "command"] = Field(
        default="alembic", description="`alembic` (in-process) or `command` (a migration CLI such as Prisma)"
    )
    alembic_config: Path | None = Field(
        default=None, description="the app's alembic.ini; None: no file, script_location alone"
    )
    script_location: str | None = Field(
        default=None,
        description="directory of the app's Alembic environment (env.py, versions/)",
        examples=["/srv/backend/alembic"],
    )
    status_argv: list[str] = Field(
        default_factory=list,
        description="command tool: prints the status (JSON list), e.g. npx prisma migrate status",
        examples=[["npx", "prisma", "migrate", "status"]],
    )
    apply_argv: list[str] = Field(
        default_factory=list,
        description="command tool: applies the migrations (JSON list), e.g. npx prisma migrate deploy",
        examples=[["npx", "prisma", "migrate", "deploy"]],
    )
    apply_target_argv: list[str] = Field(
        default_factory=list,
        description="command tool: applies up to a target the run names, '{target}' standing for it"
        " (e.g. npx node-pg-migrate up {target}); empty: the tool takes no target",
    )
    up_to_date_pattern: str | None = Field(
        default=None,
        description="command tool: regular expression the status output matches when nothing is pending",
        examples=["Database schema is up to date"],
    )
    cwd: Path | None = Field(default=None, description="command tool: working directory (the backend)")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="command tool: extra environment (JSON map)",
        examples=[{"NODE_ENV": "production"}],
    )
    database_url_env: str | None = Field(
        default="DATABASE_URL", description="command tool: variable that gets the database DSN (masked)"
    )
    smoke_queries: list[str] = Field(
        default_factory=list,
        description="read-only SQL run after migrating (JSON list); an error or no row fails",
        examples=[["SELECT 1 FROM users LIMIT 1"]],
    )
    lock_key: str | None = Field(
        default=None, description="advisory lock name of a migration; None: swagger2mcp-ops:migrate:<db>"
    )
    lock_timeout_seconds: float = Field(
        default=60.0, ge=0, description="how long a second migration run waits for the lock, seconds"
    )
    apply_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="time limit of applying the migrations, seconds"
    )
    status_timeout_seconds: float = Field(
        default=120.0, gt=0, description="command tool: time limit of the status command, seconds"
    )
    smoke_timeout_seconds: float = Field(
        default=30.0, gt=0, description="time limit of each smoke query, seconds"
    )
    approval_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="how long migrate-database waits for approval, seconds"
    )
    runs_schema: str = Field(
        default="swagger2mcp_ops", description="schema of the migration_runs table (in the app's database)"
    )
    maintenance_on_argv: list[str] = Field(
        default_factory=list,
        description="command turning the app's maintenance mode on (JSON list)",
        examples=[["docker", "compose", "exec", "-T", "backend", "touch", "/app/maintenance"]],
    )
    maintenance_off_argv: list[str] = Field(
        default_factory=list,
        description="command turning maintenance mode off (JSON list)",
        examples=[["docker", "compose", "exec", "-T", "backend", "rm", "-f", "/app/maintenance"]],
    )
    maintenance_on_url: str | None = Field(
        default=None,
        description="http(s) endpoint turning maintenance mode on",
        examples=["http://127.0.0.1:3000/admin/maintenance/on"],
    )
    maintenance_off_url: str | None = Field(
        default=None,
        description="http(s) endpoint turning maintenance mode off",
        examples=["http://127.0.0.1:3000/admin/maintenance/off"],
    )
    maintenance_http_method: Literal["POST", "PUT", "DELETE", "GET"] = Field(
        default="POST", description="HTTP method of the maintenance URLs: `POST`, `PUT`, `DELETE` or `GET`"
    )
    maintenance_timeout_seconds: float = Field(
        default=60.0, gt=0, description="time limit of each maintenance command or request, seconds"
    )

    @field_validator("runs_schema")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not value or not (value[0].isalpha() or value[0] == "_") or not value.replace("_", "a").isalnum():
            raise ValueError("must be a plain SQL identifier (letters, digits, '_')")
        return value

    @field_validator("up_to_date_pattern")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"is not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _tool_complete(self) -> MigrationsSettings:
        if self.tool == "command":
            missing = [
                name
                for name in ("status_argv", "apply_argv", "up_to_date_pattern")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"tool 'command' needs {', '.join(missing)}")
        if (self.maintenance_on_argv or self.maintenance_on_url) and not (
            self.maintenance_off_argv or self.maintenance_off_url
        ):
            raise ValueError("maintenance mode can be turned on but not off: set maintenance_off_*")
        for url in (self.maintenance_on_url, self.maintenance_off_url):
            if url is not None and urlsplit(url).scheme not in {"http", "https"}:
                raise ValueError("maintenance URLs must be http(s) URLs")
        return self


class CertEndpoint(_Section):
    """One TLS endpoint whose served certificate is checked: where to connect and the SNI name."""

    host: str = Field(min_length=1, description="address or name to connect to")
    port: int = Field(default=443, ge=1, le=65535, description="TCP port of the TLS endpoint")
    server_name: str | None = Field(
        default=None, description="SNI name, also the name the certificate must be valid for; default host"
    )
    certificate: str | None = Field(
        default=None,
        description="certbot lineage or PEM path this endpoint must serve; default: the watched one covering"
        " server_name",
    )

    @property
    def sni(self) -> str:
        return self.server_name or self.host

    @property
    def label(self) -> str:
        return f"{self.sni} at {self.host}:{self.port}"


class CertificatesSettings(_Section):
    """TLS certificates: what to watch, where they are served, how certbot renews them, how to reload."""

    certbot_path: Path | None = Field(
        default=None, description="certbot program; default: the certbot beside this Python, else on PATH"
    )
    config_dir: Path = Field(
        default=Path("/etc/letsencrypt"), description="certbot --config-dir (its live/ and renewal/ lineages)"
    )
    work_dir: Path = Field(default=Path("/var/lib/letsencrypt"), description="certbot --work-dir")
    logs_dir: Path = Field(
        default=Path("/var/log/letsencrypt"), description="certbot --logs-dir (letsencrypt.log)"
    )
    acme_server: str = Field(
        default="https://acme-v02.api.letsencrypt.org/directory",
        description="https:// URL of the ACME directory (certbot --server) for lineages whose renewal"
        " configuration names no server; each other lineage renews against the CA that issued it",
        examples=["https://acme-staging-v02.api.letsencrypt.org/directory"],
    )
    force_acme_server: bool = Field(
        default=False,
        description="renew every lineage against acme_server, whatever server its renewal configuration"
        " names (to move lineages to another CA)",
    )
    acme_ca_bundle: Path | None = Field(
        default=None,
        description="roots that sign the ACME server's own HTTPS, for certbot (REQUESTS_CA_BUNDLE);"
        " default: certbot's trust. Not the roots of served certificates: see ca_bundle",
        examples=["/etc/step-ca/certs/root_ca.crt"],
    )
    lineages: list[str] | None = Field(
        default=None,
        description="certbot certificate names to watch and renew (JSON list); default: all in config_dir",
        examples=[["api.example.com"]],
    )
    pem_paths: list[Path] = Field(
        default_factory=list,
        description="other certificate files to watch (JSON list; certbot does not renew them)",
        examples=[["/etc/nginx/tls/internal.pem"]],
    )
    endpoints: list[CertEndpoint] = Field(
        default_factory=list,
        description="TLS endpoints whose served certificate is checked (JSON list of objects)",
        examples=[[{"host": "127.0.0.1", "port": 443, "server_name": "api.example.com"}]],
    )
    ca_bundle: Path | None = Field(
        default=None,
        description="roots that sign the certificates endpoints serve, to validate them; default: system"
        " trust. Not the ACME server's HTTPS: see acme_ca_bundle",
        examples=["/etc/ssl/letsencrypt-staging-roots.pem"],
    )
    renew_threshold_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="a certificate with fewer days left is renewed, days; at most two thirds of the"
        " certificate's lifetime apply (never renewed in the first third of its life unless forced)",
    )
    min_days_after_renewal: int | None = Field(
        default=None,
        ge=0,
        description="days a renewed, served certificate must have left; default: the threshold that"
        " applies to it, so that it is not due again",
    )
    reload_method: Literal["nginx", "compose", "kubernetes", "none"] = Field(
        default="nginx",
        description="how nginx is reloaded after a renewal: `nginx`, `compose`, `kubernetes` or `none`",
    )
    reload_argv: list[str] | None = Field(
        default=None,
        description="reload command for `nginx` or `compose` (JSON list); default nginx -s reload, or"
        " docker compose exec -T <service> nginx -s reload",
    )
    reload_services: list[str] = Field(
        default_factory=lambda: ["nginx"],
        min_length=1,
        description="Compose services or Kubernetes Deployments that run nginx (JSON list)",
    )
    certbot_timeout_seconds: float = Field(
        default=600.0, gt=0, description="time limit of each certbot run, seconds"
    )
    reload_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="time limit of a reload command or of the restarted nginx becoming ready, seconds",
    )
    handshake_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="timeout of each TLS handshake with an endpoint, seconds"
    )
    verify_timeout_seconds: float = Field(
        default=60.0,
        ge=0,
        description="how long a reloaded server may take to serve the new certificate, seconds",
    )

    @field_validator("acme_server")
    @classmethod
    def _valid_server(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.netloc:
            raise ValueError("must be the https:// URL of an ACME directory")
        return value

    @field_validator("lineages")
    @classmethod
    def _valid_lineages(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"{name!r} is not a certbot certificate name (see `certbot certificates`)")
        return value

    @field_validator("reload_argv")
    @classmethod
    def _valid_argv(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("must name a program and its arguments, e.g. ['nginx', '-s', 'reload']")
        return value


class DependenciesSettings(_Section):
    """Dependency updates of the application: its source, where updates are made, registry, build."""

    source_dir: Path = Field(
        default=Path("."), description="the application's live checkout (package.json); never modified"
    )
    work_dir: Path = Field(
        default=Path("./var/dependencies"), description="where working copies of the source are made"
    )
    keep_working_copies: int = Field(
        default=5,
        ge=1,
        description=(
            "run directories (working copy with node_modules) kept in work_dir, newest first; each run"
            " removes the older ones it made (marked .swagger2mcp-ops-run), never one in use or anything"
            " else"
        ),
    )
    registry_url: str | None = Field(
        default=None,
        description="npm registry URL; default: the project's own .npmrc or npm's default",
        examples=["https://registry.npmjs.org/"],
    )
    registry_token: SecretStr | None = Field(default=None, description="auth token for registry_url (secret)")
    npm_cache_dir: Path | None = Field(default=None, description="npm cache; default: npm's (~/.npm)")
    test_argv: list[str] = Field(
        default_factory=lambda: ["npm", "test"],
        min_length=1,
        description="the app's test command, run in the working copy (JSON list)",
        examples=[["npm", "run", "test:ci"]],
    )
    build_argv: list[str] | None = Field(
        default=None,
        description=(
            "image build command (JSON list; {image}, {tag}, {ref}, {context} filled in, IMAGE_NAME and"
            " IMAGE_TAG set); default docker build -t {ref} {context}"
        ),
        examples=[["docker", "compose", "-f", "docker-compose.production.yml", "build"]],
    )
    image_name: str = Field(default="swagger2mcp-backend", description="repository of the built image")
    install_timeout_seconds: float = Field(
        default=600.0, gt=0, description="time limit of each npm ci / install / update, seconds"
    )
    audit_timeout_seconds: float = Field(
        default=120.0, gt=0, description="time limit of each npm audit / outdated / view, seconds"
    )
    test_timeout_seconds: float = Field(
        default=900.0, gt=0, description="time limit of the test command, seconds"
    )
    build_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="time limit of the image build, seconds"
    )
    git_timeout_seconds: float = Field(
        default=60.0, gt=0, description="time limit of each git command, seconds"
    )
    git_author_name: str = Field(default="swagger2mcp-ops", description="author name of the update commits")
    git_author_email: str = Field(
        default="swagger2mcp-ops@localhost", description="author e-mail of the update commits"
    )
    branch_prefix: str = Field(default="deps/", description="update branches: <prefix><scope>-<time>")

    @field_validator("registry_url")
    @classmethod
    def _valid_registry(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in {"http", "https"}:
            raise ValueError("must be an http(s) URL such as https://registry.npmjs.org/")
        return value

    @field_validator("build_argv")
    @classmethod
    def _valid_build_argv(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("must name a program and its arguments, e.g. ['docker', 'compose', 'build']")
        return value


class IncidentsSettings(_Section):
    """Emergency procedures: outage triage, data recovery, security incidents, Redis out of memory."""

    release_window_hours: float = Field(
        default=2.0, gt=0, description="a release this recent makes outage-triage propose a rollback, hours"
    )
    stop_services: list[str] | None = Field(
        default=None,
        description="services recover-data scales to 0 and back (JSON list); default runtime.services",
    )
    validation_queries: list[str] = Field(
        default_factory=list,
        description=(
            "read-only SQL run after a recovery; an error, no row, or a false/NULL/0 first column fails"
        ),
        examples=[["SELECT count(*) > 0 FROM users"]],
    )
    validation_timeout_seconds: float = Field(
        default=60.0, gt=0, description="time limit of each validation query, seconds"
    )
    approval_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="how long the incident flows wait for approval, seconds"
    )
    evidence_prefix: str = Field(default="incidents", description="storage prefix of evidence bundles")
    evidence_log_lines: int = Field(
        default=5000, ge=0, le=1_000_000, description="log lines per service in an evidence bundle"
    )
    rotate_roles: list[str] = Field(
        default_factory=list,
        description="PostgreSQL roles whose password security-incident rotates (JSON list)",
        examples=[["swagger2mcp"]],
    )
    role_secret_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "app secret keys carrying each rotated role's password (JSON map role -> keys); a URL value"
            " gets its password replaced, any other is replaced whole"
        ),
        examples=[{"swagger2mcp": ["DATABASE_URL"]}],
    )
    app_secrets: list[str] = Field(
        default_factory=list,
        description="app secret keys regenerated with random values on rotation (JSON list)",
        examples=[["JWT_SECRET"]],
    )
    secret_bytes: int = Field(default=32, ge=16, le=128, description="random bytes per generated secret")
    compose_env_file: Path | None = Field(
        default=None,
        description="env file holding the app secrets (Compose); default runtime.compose.env_file",
    )
    kubernetes_secret: str | None = Field(
        default=None,
        description="Kubernetes Secret (in runtime.kubernetes.namespace) holding the app secrets",
    )
    restart_services: list[str] | None = Field(
        default=None, description="services restarted after a rotation (JSON list); default runtime.services"
    )
    key_census_depth: int = Field(
        default=2, ge=1, le=5, description="flush-redis key census: name segments ('a:b:...') grouped"
    )
    key_census_max_keys: int = Field(
        default=1_000_000, ge=1, description="flush-redis key census: keys SCAN reads at most"
    )
    scan_count: int = Field(default=1000, ge=10, le=100_000, description="SCAN COUNT hint of the key census")

    @field_validator("rotate_roles")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        for role in value:
            if not role or len(role) > 63 or "\x00" in role:
                raise ValueError(f"{role!r} is not a PostgreSQL role name")
        return value

    @field_validator("app_secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        import re

        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
                raise ValueError(f"{name!r} is not an environment variable / Secret key name")
        return value

    @field_validator("evidence_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or ".." in value.split("/") or "\\" in value:
            raise ValueError("must be a relative storage prefix such as 'incidents'")
        return value.strip("/")

    @model_validator(mode="after")
    def _keys_of_rotated_roles(self) -> IncidentsSettings:
        import re

        for role, keys in self.role_secret_keys.items():
            if role not in self.rotate_roles:
                raise ValueError(f"role_secret_keys names role {role!r}, which is not in rotate_roles")
            for key in keys:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
                    raise ValueError(f"{key!r} is not an environment variable / Secret key name")
                if key in self.app_secrets:
                    raise ValueError(
                        f"{key!r} is both an app secret and a carrier of role {role!r}'s password"
                    )
        return self


class ApprovalSettings(_Section):
    """Who may skip the approval form of destructive flows."""

    allow_preapproved: bool | None = Field(
        default=None,
        description=(
            "whether approved=true may replace the approval form; unset: allowed unless"
            " runtime.environment is `production`"
        ),
    )


class ChannelSettings(_Section):
    """One notification channel: where a message goes and which audiences it serves."""

    kind: Literal["slack", "email", "pagerduty", "webhook"] = Field(
        description="`slack` (incoming webhook), `email` (SMTP), `pagerduty` (Events API v2) or `webhook`"
    )
    audiences: list[str] = Field(
        min_length=1,
        description="audiences (named in routes) this channel serves, e.g. on-call, devops, chat (JSON list)",
    )
    url: SecretStr | None = Field(
        default=None,
        description="slack/webhook: the URL posted to; pagerduty: Events API endpoint override (secret)",
    )
    routing_key: SecretStr | None = Field(
        default=None, description="pagerduty: the service's Events API v2 integration key (secret)"
    )
    to: list[str] = Field(default_factory=list, description="email: the recipients (JSON list)")
    authorization: SecretStr | None = Field(
        default=None, description="webhook: Authorization header value, e.g. 'GenieKey ...' (secret)"
    )

    @model_validator(mode="after")
    def _complete(self) -> ChannelSettings:
        for audience in self.audiences:
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", audience):
                raise ValueError(f"audience {audience!r} must be lowercase letters, digits and dashes")
        if self.kind in {"slack", "webhook"} and self.url is None:
            raise ValueError(f"a {self.kind} channel needs url (https://hooks.example.com/...)")
        if self.url is not None and urlsplit(self.url.get_secret_value()).scheme not in {"http", "https"}:
            raise ValueError("url must be an http(s) URL")
        if self.kind == "pagerduty" and self.routing_key is None:
            raise ValueError("a pagerduty channel needs routing_key (the Events API v2 integration key)")
        if self.kind == "email" and not self.to:
            raise ValueError('an email channel needs to (a JSON list of recipients, ["ops@example.com"])')
        for address in self.to:
            if "@" not in address or any(c in address for c in " ,;<>\r\n"):
                raise ValueError(f"{address!r} is not one e-mail address")
        return self


class SmtpSettings(_Section):
    """The SMTP server e-mail channels send through."""

    host: str | None = Field(
        default=None, description="SMTP server host; None: e-mail channels fail to deliver, saying so"
    )
    port: int = Field(default=587, ge=1, le=65535, description="SMTP server port (587: submission)")
    starttls: bool = Field(default=True, description="upgrade the connection with STARTTLS before auth")
    username: str | None = Field(default=None, description="SMTP auth user; None: no authentication")
    password: SecretStr | None = Field(default=None, description="SMTP auth password (secret)")
    sender: str = Field(default="swagger2mcp-ops@localhost", description="the From address of every message")
    verify_tls: bool = Field(default=True, description="verify the server's certificate on STARTTLS")


class NotificationsSettings(_Section):
    """Escalation: the channels routes deliver to, and how delivery and health paging behave."""

    channels: dict[str, ChannelSettings] = Field(
        default_factory=dict,
        description="named channels (JSON map name -> {kind, audiences, url/routing_key/to}); secrets inside",
        examples=[
            {
                "chat": {
                    "kind": "slack",
                    "audiences": ["chat", "on-call"],
                    "url": "https://hooks.example.com/T0",
                },
                "pager": {"kind": "pagerduty", "audiences": ["on-call"], "routing_key": "R0UTINGKEY"},
            }
        ],
    )
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    ui_url: str = Field(
        default="http://127.0.0.1:4200",
        description="the Prefect UI's base URL, for the run links in messages",
        examples=["https://prefect.example.com"],
    )
    pagerduty_url: str = Field(
        default="https://events.pagerduty.com/v2/enqueue", description="PagerDuty Events API v2 endpoint"
    )
    consecutive_unhealthy: int = Field(
        default=2, ge=1, le=100, description="consecutive unhealthy health checks before on-call is paged"
    )
    attempts: int = Field(default=4, ge=1, le=20, description="delivery attempts per channel and message")
    backoff_seconds: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="wait before the 2nd attempt, doubled before each next, seconds",
    )
    timeout_seconds: float = Field(
        default=10.0, gt=0, description="time limit of one delivery attempt, seconds"
    )
    state_prefix: str = Field(
        default="notifications", description="storage prefix of the paging state (open incidents, counts)"
    )

    @field_validator("channels")
    @classmethod
    def _channel_names(cls, value: dict[str, ChannelSettings]) -> dict[str, ChannelSettings]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"channel name {name!r} must be letters, digits, '-' or '_'")
        return value

    @field_validator("ui_url", "pagerduty_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"http", "https"}:
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("state_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or ".." in value.split("/") or "\\" in value:
            raise ValueError("must be a relative storage prefix such as 'notifications'")
        return value.strip("/")


class OpsSettings(BaseSettings):
    """All settings of swagger2mcp-ops. Load with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    stack: str = Field(
        default="swagger2mcp",
        description="name of the stack in reports, events and artifact keys (letters, digits, - and _)",
    )
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    uploads: UploadsSettings = Field(default_factory=UploadsSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    dependencies: DependenciesSettings = Field(default_factory=DependenciesSettings)
    certificates: CertificatesSettings = Field(default_factory=CertificatesSettings)
    backup: BackupSettings = Field(default_factory=BackupSettings)
    wal: WalSettings = Field(default_factory=WalSettings)
    diagnose: DiagnoseSettings = Field(default_factory=DiagnoseSettings)
    migrations: MigrationsSettings = Field(default_factory=MigrationsSettings)
    incidents: IncidentsSettings = Field(default_factory=IncidentsSettings)
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings)
    notifications: NotificationsSettings = Field(default_factory=NotificationsSettings)

    @model_validator(mode="after")
    def _valid_stack(self) -> OpsSettings:
        if not self.stack or not all(c.isalnum() or c in "-_" for c in self.stack):
            raise ValueError("stack must be letters, digits, '-' or '_'")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = _config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def _config_file() -> Path | None:
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise SettingsError(f"{CONFIG_ENV}={named!r} names no readable file; fix the path or unset it")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _source_of(loc: tuple[Any, ...]) -> str:
    """Say where the value at ``loc`` came from: an environment variable, the TOML file, or a default."""
    path = [str(part) for part in loc if not isinstance(part, int)]
    if not path:
        return "settings"
    env_name = ENV_PREFIX + "__".join(p.upper() for p in path)
    if env_name in os.environ:
        return f"environment variable {env_name}"
    # A whole section may come as JSON in one variable (OPS_HEALTH='{"urls": [...]}').
    for depth in range(len(path) - 1, 0, -1):
        name = ENV_PREFIX + "__".join(p.upper() for p in path[:depth])
        if name in os.environ:
            return f"environment variable {name}"
    config = os.environ.get(CONFIG_ENV) or (
        DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).is_file() else None
    )
    if config:
        line = _toml_line(Path(config), path)
        where = f", line {line}" if line else ""
        return f"config file {config} ([{'.'.join(path[:-1]) or 'top level'}] {path[-1]}{where})"
    return "embedded default"


def _toml_line(config: Path, path: Sequence[str]) -> int | None:
    """The line of ``path``'s key in a TOML file (plain ``[a.b]`` tables and ``key =`` lines)."""
    try:
        text = config.read_text()
    except OSError:
        return None
    table: tuple[str, ...] = ()
    want_table, key = tuple(path[:-1]), path[-1]
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9_.\- ]+?)\s*\]", line)
        if header:
            table = tuple(part.strip() for part in header.group(1).split("."))
        elif table == want_table and re.match(rf"{re.escape(key)}\s*=", line):
            return number
    return None


def _shown_value(loc: tuple[Any, ...], value: Any) -> str:
    secret_names = {"dsn", "url", "password", "secret_access_key", "access_key_id", "token"}
    secret_names.add("replication_dsn")
    if loc and str(loc[-1]) in secret_names and isinstance(value, str):
        if is_ambiguous_url(value):
            # Where the password ends cannot be told: show nothing of what follows the scheme.
            return repr(value.partition("://")[0] + "://***")
        return repr(mask_url(value))
    if isinstance(value, SecretStr):
        return "'**********'"
    shown = repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


# --- the names that exist ---------------------------------------------------------------------------

# OPS_ variables that are not settings: the config file's name, and the test suite's own knobs.
RESERVED_VARIABLES = frozenset({CONFIG_ENV})
RESERVED_PREFIXES = ("OPS_TEST_",)


@dataclass(frozen=True)
class SettingField:
    """One setting of the model: its path, its field and whether it is a section or an open map."""

    path: tuple[str, ...]
    field: FieldInfo
    section: bool

    @property
    def env(self) -> str:
        """Its environment variable (``OPS_POSTGRES__DSN``)."""
        return ENV_PREFIX + "__".join(p.upper() for p in self.path)

    @property
    def open_map(self) -> bool:
        """A ``dict`` setting: variables below it (``OPS_X__Y__ANYKEY``) are its keys."""
        return typing.get_origin(self.field.annotation) is dict


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (``X`` or ``X | None``); None for a value (``list[X]`` is a value)."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    candidates = typing.get_args(annotation) if is_union else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def setting_fields(model: type[BaseModel] = OpsSettings, prefix: tuple[str, ...] = ()) -> list[SettingField]:
    """Every section and every setting of ``model``, depth first, in declaration order."""
    found: list[SettingField] = []
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        section = _section_type(info.annotation)
        found.append(SettingField(path, info, section is not None))
        if section is not None:
            found.extend(setting_fields(section, path))
    return found


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``OPS_`` variable that names no setting, with the closest valid name."""
    fields = setting_fields()
    known = {f.env for f in fields}
    open_maps = [f.env + "__" for f in fields if f.open_map]
    leaves = [f.env for f in fields if not f.section]
    lines = []
    for variable in sorted(environ):
        name = variable.upper()
        reserved = name in RESERVED_VARIABLES or name.startswith(RESERVED_PREFIXES)
        if not name.startswith(ENV_PREFIX) or reserved:
            continue
        if name in known or name.startswith(tuple(open_maps)):
            continue
        guess = _closest(name, leaves) or _closest(name, known)
        hint = f"did you mean {guess}?" if guess else "see the settings table in the README"
        lines.append(f"- environment variable {variable} names no setting; {hint}")
    return lines


# --- examples of valid values -----------------------------------------------------------------------


def _field_at(loc: Sequence[Any]) -> SettingField | None:
    path = tuple(str(p) for p in loc if not isinstance(p, int))
    for candidate in setting_fields():
        if candidate.path == path:
            return candidate
    return None


def _placeholder(annotation: Any) -> Any:
    """A value of ``annotation``'s type, for fields whose default says nothing (None, empty)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (list, tuple, set, frozenset):
        return [_placeholder(args[0]) if args else "item"]
    if origin is dict:
        return {"key": _placeholder(args[1]) if len(args) == 2 else "value"}
    if origin is Literal:
        return typing.get_args(annotation)[0]
    if args and origin is not None:  # X | None and the like
        return _placeholder(args[0])
    for kind, value in ((bool, True), (int, 10), (float, 1.5), (Path, "/srv/path"), (SecretStr, "secret")):
        if annotation is kind:
            return value
    return "text"


def example_value(setting: SettingField) -> str:
    """A valid value of ``setting`` as an environment variable takes it (JSON for lists and maps)."""
    info = setting.field
    if info.examples:
        value: Any = info.examples[0]
    else:
        value = info.get_default(call_default_factory=True)
        if isinstance(value, SecretStr):
            # An embedded default is no secret; shown masked all the same, as every URL is.
            value = mask_url(value.get_secret_value())
        if value is None or value == [] or value == {}:
            value = _placeholder(info.annotation)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _example_line(loc: Sequence[Any]) -> str:
    setting = _field_at(loc)
    if setting is None or setting.section:
        return ""
    value = example_value(setting)
    quoted = f"'{value}'" if any(c in value for c in ' []{}""') else value
    return f" (for example {setting.env}={quoted})"


# --- loading ------------------------------------------------------------------------------------------


def _parse_error_lines(exc: PydanticSettingsError) -> list[str]:
    """pydantic-settings could not parse a variable (JSON expected): name it and show the form."""
    field = re.search(r'field "([^"]+)"', str(exc))
    section = field.group(1) if field else ""
    lines = []
    for variable in sorted(os.environ):
        name = variable.upper()
        if not name.startswith(f"{ENV_PREFIX}{section.upper()}"):
            continue
        setting = _field_at(tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__")))
        if setting is None:
            continue
        try:
            json.loads(os.environ[variable])
        except ValueError:
            value = _shown_value(setting.path, os.environ[variable])
            lines.append(
                f"- {'.'.join(setting.path)} = {value} from environment variable {variable}:"
                f" not valid JSON; lists, maps and sections are written as JSON"
                f"{_example_line(setting.path)}"
            )
    fallback = f"- {exc}; lists, maps and sections are written as JSON, e.g. OPS_QUEUE__NAMES='[\"a\"]'"
    return lines or [fallback]


def load_settings(**overrides: Any) -> OpsSettings:
    """Load and validate the settings.

    Args:
        overrides: values that win over every other source (tests, and flows that take a settings
            section as a parameter).

    Returns:
        The frozen settings.

    Raises:
        SettingsError: an ``OPS_`` variable or TOML key names no setting, the TOML file does not parse,
            or a value is missing, malformed, of the wrong type or out of range. The one message names
            each problem, its (masked) value and its source (variable, or file and key/line), the closest
            valid name where one was mistyped, and an example of a valid value. Raised before anything
            is done.
    """
    unknown = unknown_variables(os.environ)
    if unknown:
        raise SettingsError(_INVALID + "\n".join(unknown))
    try:
        return OpsSettings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        config = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_FILE
        raise SettingsError(
            _INVALID + f"- config file {config} is not valid TOML: {exc}. Strings are quoted"
            ' (dsn = "postgresql://app@db:5432/app"), lists are ["a", "b"], sections are [name]'
        ) from None
    except PydanticSettingsError as exc:
        raise SettingsError(_INVALID + "\n".join(_parse_error_lines(exc))) from None
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            field = ".".join(str(p) for p in loc) or "settings"
            if error["type"] == "extra_forbidden":
                lines.append(f"- {field} from {_source_of(loc)} names no setting; {_sibling_hint(loc)}")
                continue
            message = str(error["msg"]).removeprefix("Value error, ")
            value = _shown_value(loc, error.get("input"))
            lines.append(f"- {field} = {value} from {_source_of(loc)}: {message}{_example_line(loc)}")
        raise SettingsError(_INVALID + "\n".join(lines)) from None


_INVALID = "invalid settings; nothing was done. Fix these values and run again:\n"


def _sibling_hint(loc: tuple[Any, ...]) -> str:
    parent = tuple(str(p) for p in loc[:-1])
    siblings = [f.path[-1] for f in setting_fields() if f.path[:-1] == parent]
    guess = _closest(str(loc[-1]), siblings)
    return f"did you mean {guess}?" if guess else "see the settings table in the README"
