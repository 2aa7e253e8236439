"""The one typed settings model of swagger2mcp-ops.

Sources, highest priority first:

1. environment variables with the prefix ``OPS_`` and ``__`` between nested names
   (``OPS_POSTGRES__DSN``, ``OPS_QUEUE__NAMES='["default","emails"]'``);
2. a TOML file named by ``OPS_CONFIG`` (default: ``ops.toml`` in the working directory when present);
3. the embedded defaults, which serve a local machine with no file at all: PostgreSQL and Redis on
   localhost, backups under ``./var/backups``, runtime ``none``.

Settings are loaded once per flow run with :func:`load_settings`. A bad value fails at load with a
:class:`SettingsError` that names the field, the bad value (masked when secret) and where it came from,
before any flow does anything. Per-run intent (dry_run, older_than_days, image_tag, ...) is a flow
parameter, never a setting.
"""

from __future__ import annotations

import os
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
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tasks.errors import SettingsError
from tasks.secrets import mask_url

ENV_PREFIX = "OPS_"
CONFIG_ENV = "OPS_CONFIG"
DEFAULT_CONFIG_FILE = "ops.toml"


class _Section(BaseModel):
    """Base of every settings section: frozen, and unknown keys are errors (a typo must not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PostgresSettings(_Section):
    """The application's PostgreSQL database."""

    dsn: SecretStr = Field(
        default=SecretStr("postgresql://postgres@127.0.0.1:5432/swagger2mcp"),
        description="libpq URL of the application's database; the password is secret.",
    )
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    statement_timeout_seconds: float = Field(default=30.0, gt=0)

    @field_validator("dsn")
    @classmethod
    def _valid_dsn(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
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

    url: SecretStr = Field(default=SecretStr("redis://127.0.0.1:6379/0"))
    socket_timeout_seconds: float = Field(default=3.0, gt=0)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: SecretStr) -> SecretStr:
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

    names: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    prefix: str = "bull"


class StorageSettings(_Section):
    """Where backups, evidence bundles and reports are stored."""

    url: str = "file://./var/backups"
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto, R2).")
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    multipart_chunk_mb: int = Field(default=16, ge=5, le=512)

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

    timezone: str = Field(default="UTC", description="zone whose calendar days/weeks/months retention uses")
    pg_dump: str = "pg_dump"
    pg_restore: str = "pg_restore"
    zstd_level: int = Field(default=3, ge=1, le=22)
    zstd_threads: int = Field(default=0, ge=0, le=64, description="0: compress on the calling thread")
    content_hashes: bool = Field(default=True, description="record a per-table content hash with the counts")
    restore_jobs: int = Field(
        default=2, ge=1, le=32, description="pg_restore --jobs for indexes and constraints"
    )
    restore_data_streams: int | None = Field(
        default=None,
        ge=1,
        le=2,
        description=(
            "readings of the backup that load table data at once (2: the largest table on its own);"
            " each reads the whole object, so None means 2 for file:// storage and 1 for S3"
        ),
    )
    spool_dir: Path | None = Field(default=None, description="parallel restore scratch files; None: TMPDIR")
    maintenance_database: str = Field(default="postgres", description="where CREATE/ALTER DATABASE run")
    keep_last: int = Field(default=7, ge=1)
    keep_daily: int = Field(default=7, ge=0)
    keep_weekly: int = Field(default=4, ge=0)
    keep_monthly: int = Field(default=6, ge=0)
    orphan_grace_hours: float = Field(
        default=24.0, gt=0, description="unfinished objects older than this are removed by pruning"
    )
    upload_attempts: int = Field(default=5, ge=1, le=20, description="S3 attempts per request")
    dump_timeout_seconds: float = Field(default=6 * 3600.0, gt=0)
    restore_timeout_seconds: float = Field(default=6 * 3600.0, gt=0)
    lock_timeout_seconds: float = Field(default=30.0, ge=0)
    approval_timeout_seconds: float = Field(default=3600.0, gt=0)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("is not a known IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
        return value


class UploadsSettings(_Section):
    """The application's uploads directory."""

    root: Path = Path("./var/uploads")
    expected_owner: str | None = Field(default=None, description="user that must own the uploads root")
    expected_mode: str | None = Field(default=None, description="octal mode the root must have, e.g. '0755'")
    protect: list[str] = Field(
        default_factory=lambda: [".gitkeep", "keep/**"],
        description=(
            "patterns of files cleanup never removes: a pattern without '/' matches a file name at any"
            " depth; one with '/' matches the path relative to the root ('*' within one name, '**' across"
            " directories)"
        ),
    )
    reference_query: str | None = Field(
        default=None,
        description=(
            "SQL whose first column lists the uploads the application still references; those files are"
            " kept. For Swagger2MCP e.g. 'SELECT path FROM uploads' (run as a subquery with a"
            " 'path = ANY(...)' filter, so an index on that column is used). None: no database check"
        ),
    )
    reference_prefix: str | None = Field(
        default=None,
        description=(
            "what the application stores in front of the path relative to the root, e.g. 'uploads/' or"
            " '/app/backend/uploads/'; a stored value matches as the relative path or prefix + path"
        ),
    )
    quarantine_dir: Path | None = Field(
        default=None,
        description="quarantine (on the root's filesystem); None: <root>/../.uploads-quarantine",
    )
    quarantine_retention_days: int = Field(default=14, ge=0, description="quarantine runs older are purged")
    cross_filesystem: bool = Field(
        default=False, description="also scan directories mounted from another filesystem below the root"
    )
    plan_dir: Path | None = Field(
        default=None,
        description="where plans (JSON Lines) are written; None: <storage file:// dir>/uploads-plans or var/",
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
    files: list[Path] = Field(default_factory=lambda: [Path("docker-compose.yml")], min_length=1)
    env_file: Path | None = None
    project_directory: Path | None = None
    command: list[str] = Field(
        default_factory=lambda: ["docker", "compose"], min_length=1, description="the Compose v2 CLI"
    )
    docker_host: str | None = Field(default=None, description="DOCKER_HOST; default: the environment's")
    docker_config: Path | None = Field(default=None, description="DOCKER_CONFIG (where cli-plugins live)")
    images_file: Path | None = Field(
        default=None,
        description="Compose override file that pins each service's image; default beside the release store",
    )
    pull: Literal["missing", "never", "always"] = "missing"
    stop_timeout_seconds: int = Field(default=10, ge=0, le=600)
    command_timeout_seconds: float = Field(default=300.0, gt=0)


class KubernetesRuntimeSettings(_Section):
    """The Kubernetes namespace the services run in as Deployments (``runtime.kind = "kubernetes"``)."""

    namespace: str = "swagger2mcp"
    kubeconfig: Path | None = Field(default=None, description="default: in-cluster, then ~/.kube/config")
    context: str | None = None
    api_url: str | None = Field(default=None, description="API server URL; overrides the kubeconfig's")
    token: SecretStr | None = None
    verify_ssl: bool = True
    request_timeout_seconds: float = Field(default=30.0, gt=0)


class RuntimeSettings(_Section):
    """Where the application's services run, and how releases of them are recorded."""

    kind: Literal["compose", "kubernetes", "none"] = "none"
    services: list[str] = Field(default_factory=lambda: ["backend", "worker"])
    environment: str = Field(
        default="staging", description="the environment these settings point at (staging, production)"
    )
    compose: ComposeRuntimeSettings = Field(default_factory=ComposeRuntimeSettings)
    kubernetes: KubernetesRuntimeSettings = Field(default_factory=KubernetesRuntimeSettings)
    release_store: Path = Field(
        default=Path("./var/releases"), description="directory of the durable release records"
    )
    migration_query: str | None = Field(
        default=None,
        description="SQL returning the applied migration revision when there is no alembic_version table",
    )
    ready_timeout_seconds: float = Field(default=300.0, gt=0)
    poll_interval_seconds: float = Field(default=2.0, gt=0, le=60)
    smoke_urls: list[str] = Field(default_factory=list, description="URLs a release must answer 2xx on")

    @field_validator("smoke_urls")
    @classmethod
    def _valid_smoke_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if urlsplit(url).scheme not in {"http", "https"}:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value


class HealthSettings(_Section):
    """The health check: endpoints, timeouts and the thresholds that make a check degraded."""

    urls: list[str] = Field(default_factory=list, description="the app's own HTTP health endpoints")
    timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    postgres_latency_warn_ms: float = Field(default=250.0, gt=0)
    redis_latency_warn_ms: float = Field(default=100.0, gt=0)
    http_latency_warn_ms: float = Field(default=1000.0, gt=0)
    connections_warn_ratio: float = Field(default=0.8, gt=0, le=1)
    redis_memory_warn_ratio: float = Field(default=0.9, gt=0, le=1)
    failed_jobs_warn: int = Field(default=100, ge=0)
    waiting_jobs_warn: int = Field(default=1000, ge=0)

    @field_validator("urls")
    @classmethod
    def _valid_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if urlsplit(url).scheme not in {"http", "https"}:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value


class DiagnoseSettings(_Section):
    """The diagnose flow: thresholds that make a finding a warning or critical, and what else to look at."""

    long_query_seconds: float = Field(default=5.0, gt=0, description="queries running longer are reported")
    slow_statement_mean_ms: float = Field(
        default=1000.0, gt=0, description="pg_stat_statements entries with a higher mean time are findings"
    )
    top_statements: int = Field(default=10, ge=1, le=100)
    connections_warn_ratio: float = Field(default=0.8, gt=0, le=1)
    connections_critical_ratio: float = Field(default=0.95, gt=0, le=1)
    idle_in_transaction_warn_seconds: float = Field(default=60.0, gt=0)
    redis_memory_warn_ratio: float = Field(default=0.8, gt=0, le=1)
    redis_memory_critical_ratio: float = Field(default=0.95, gt=0, le=1)
    redis_fragmentation_warn: float = Field(default=1.5, gt=1)
    failed_jobs_shown: int = Field(default=10, ge=0, le=1000, description="newest failed jobs per queue")
    waiting_jobs_warn: int = Field(default=1000, ge=0)
    log_tail_lines: int = Field(default=100, ge=0, le=10000)
    log_patterns: list[str] = Field(
        default_factory=lambda: [
            r"(?i)\berror\b",
            r"(?i)out of memory|heap|\boom\b",
            r"ECONNREFUSED|ETIMEDOUT",
        ],
        description="regular expressions whose matching lines in the log tails are counted and shown",
    )
    restarts_warn: int = Field(default=3, ge=1)
    cpu_warn_percent: float = Field(default=90.0, gt=0)
    disk_paths: list[Path] = Field(
        default_factory=list,
        description="more paths whose filesystems are checked (the uploads root and file storage always are)",
    )
    disk_free_warn_ratio: float = Field(default=0.15, gt=0, lt=1)
    disk_free_critical_ratio: float = Field(default=0.05, gt=0, lt=1)
    resolve_hosts: list[str] = Field(
        default_factory=list,
        description="more host names to resolve (PostgreSQL's, Redis's and the health URLs' always are)",
    )
    network_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    check_deadline_seconds: float = Field(default=30.0, gt=0, le=600)

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

    tool: Literal["alembic", "command"] = "alembic"
    alembic_config: Path | None = Field(
        default=None, description="the app's alembic.ini; None: no file, script_location alone"
    )
    script_location: str | None = Field(
        default=None, description="directory of the app's Alembic environment (env.py, versions/)"
    )
    status_argv: list[str] = Field(
        default_factory=list, description="command tool: prints the status, e.g. npx prisma migrate status"
    )
    apply_argv: list[str] = Field(
        default_factory=list, description="command tool: applies, e.g. npx prisma migrate deploy"
    )
    apply_target_argv: list[str] = Field(
        default_factory=list,
        description="command tool: applies up to a target the run names, '{target}' standing for it"
        " (e.g. npx node-pg-migrate up {target}); empty: the tool takes no target",
    )
    up_to_date_pattern: str | None = Field(
        default=None,
        description="command tool: regular expression the status output matches when nothing is pending",
    )
    cwd: Path | None = Field(default=None, description="command tool: working directory (the backend)")
    env: dict[str, str] = Field(default_factory=dict, description="command tool: extra environment")
    database_url_env: str | None = Field(
        default="DATABASE_URL", description="command tool: variable that gets the database DSN (masked)"
    )
    smoke_queries: list[str] = Field(
        default_factory=list, description="read-only SQL run after migrating; an error or no row fails"
    )
    lock_key: str | None = Field(default=None, description="lock name; None: swagger2mcp-ops:migrate:<db>")
    lock_timeout_seconds: float = Field(default=60.0, ge=0)
    apply_timeout_seconds: float = Field(default=3600.0, gt=0)
    status_timeout_seconds: float = Field(default=120.0, gt=0)
    smoke_timeout_seconds: float = Field(default=30.0, gt=0)
    approval_timeout_seconds: float = Field(default=3600.0, gt=0)
    runs_schema: str = Field(default="swagger2mcp_ops", description="schema of the migration_runs table")
    maintenance_on_argv: list[str] = Field(default_factory=list, description="turns maintenance mode on")
    maintenance_off_argv: list[str] = Field(default_factory=list, description="turns maintenance mode off")
    maintenance_on_url: str | None = Field(default=None, description="HTTP endpoint turning it on")
    maintenance_off_url: str | None = Field(default=None, description="HTTP endpoint turning it off")
    maintenance_http_method: Literal["POST", "PUT", "DELETE", "GET"] = "POST"
    maintenance_timeout_seconds: float = Field(default=60.0, gt=0)

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
    port: int = Field(default=443, ge=1, le=65535)
    server_name: str | None = Field(
        default=None, description="SNI name, also the name the certificate must be valid for; default host"
    )
    certificate: str | None = Field(
        default=None,
        description="certbot lineage name or PEM path this endpoint must serve; default: the watched"
        " certificate whose names cover server_name",
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
    config_dir: Path = Path("/etc/letsencrypt")
    work_dir: Path = Path("/var/lib/letsencrypt")
    logs_dir: Path = Path("/var/log/letsencrypt")
    acme_server: str = "https://acme-v02.api.letsencrypt.org/directory"
    acme_ca_bundle: Path | None = Field(
        default=None, description="CA bundle certbot trusts for the ACME server (REQUESTS_CA_BUNDLE)"
    )
    lineages: list[str] | None = Field(
        default=None, description="certbot certificate names to watch and renew; default: all in config_dir"
    )
    pem_paths: list[Path] = Field(
        default_factory=list, description="other certificate files to watch (certbot does not renew them)"
    )
    endpoints: list[CertEndpoint] = Field(default_factory=list)
    ca_bundle: Path | None = Field(
        default=None, description="CA bundle that validates served certificates; default: system trust"
    )
    renew_threshold_days: int = Field(default=30, ge=1, le=3650)
    min_days_after_renewal: int | None = Field(
        default=None,
        ge=0,
        description="days a renewed, served certificate must have left; default renew_threshold_days",
    )
    reload_method: Literal["nginx", "compose", "kubernetes", "none"] = "nginx"
    reload_argv: list[str] | None = Field(
        default=None,
        description="reload command for 'nginx' or 'compose'; default ['nginx', '-s', 'reload'] or"
        " ['docker', 'compose', 'exec', '-T', SERVICE, 'nginx', '-s', 'reload'] per service",
    )
    reload_services: list[str] = Field(
        default_factory=lambda: ["nginx"],
        min_length=1,
        description="Compose services or Kubernetes Deployments that run nginx",
    )
    certbot_timeout_seconds: float = Field(default=600.0, gt=0)
    reload_timeout_seconds: float = Field(default=120.0, gt=0)
    handshake_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    verify_timeout_seconds: float = Field(
        default=60.0, ge=0, description="how long to wait for a reloaded server to serve the new certificate"
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
    registry_url: str | None = Field(
        default=None, description="npm registry URL; default: the project's own .npmrc or npm's default"
    )
    registry_token: SecretStr | None = Field(default=None, description="auth token for registry_url")
    npm_cache_dir: Path | None = Field(default=None, description="npm cache; default: npm's (~/.npm)")
    test_argv: list[str] = Field(default_factory=lambda: ["npm", "test"], min_length=1)
    build_argv: list[str] | None = Field(
        default=None,
        description=(
            "build command; {image}, {tag}, {ref} (image:tag) and {context} are filled in, and"
            " IMAGE_NAME / IMAGE_TAG are set, e.g. ['docker', 'compose', '-f',"
            " 'docker-compose.production.yml', 'build']. Default: docker build -t {ref} {context}"
        ),
    )
    image_name: str = Field(default="swagger2mcp-backend", description="repository of the built image")
    install_timeout_seconds: float = Field(default=600.0, gt=0)
    audit_timeout_seconds: float = Field(default=120.0, gt=0)
    test_timeout_seconds: float = Field(default=900.0, gt=0)
    build_timeout_seconds: float = Field(default=1800.0, gt=0)
    git_timeout_seconds: float = Field(default=60.0, gt=0)
    git_author_name: str = "swagger2mcp-ops"
    git_author_email: str = "swagger2mcp-ops@localhost"
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
        default=2.0, gt=0, description="a release this recent makes outage-triage propose a rollback"
    )
    stop_services: list[str] | None = Field(
        default=None, description="services recover-data scales to 0 and back; default runtime.services"
    )
    validation_queries: list[str] = Field(
        default_factory=list,
        description=(
            "read-only SQL run after a recovery; an error, no row, or a false/NULL/0 first column fails"
        ),
    )
    validation_timeout_seconds: float = Field(default=60.0, gt=0)
    approval_timeout_seconds: float = Field(default=3600.0, gt=0)
    evidence_prefix: str = Field(default="incidents", description="storage prefix of evidence bundles")
    evidence_log_lines: int = Field(default=5000, ge=0, le=1_000_000, description="log lines per service")
    rotate_roles: list[str] = Field(
        default_factory=list, description="PostgreSQL roles whose password security-incident rotates"
    )
    role_secret_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "app secret keys that carry a rotated role's password, e.g. {swagger2mcp = ['DATABASE_URL']}:"
            " a URL value gets its password replaced, any other value is replaced whole"
        ),
    )
    app_secrets: list[str] = Field(
        default_factory=list, description="app secrets regenerated on rotation, e.g. ['JWT_SECRET']"
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
        default=None, description="services restarted after a rotation; default runtime.services"
    )
    key_census_depth: int = Field(default=2, ge=1, le=5, description="key name segments ('a:b:...') grouped")
    key_census_max_keys: int = Field(default=1_000_000, ge=1, description="keys SCAN reads at most")
    scan_count: int = Field(default=1000, ge=10, le=100_000, description="SCAN COUNT hint")

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


class OpsSettings(BaseSettings):
    """All settings of swagger2mcp-ops. Load with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    stack: str = Field(default="swagger2mcp", description="name of the stack, used in events and keys")
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
    diagnose: DiagnoseSettings = Field(default_factory=DiagnoseSettings)
    migrations: MigrationsSettings = Field(default_factory=MigrationsSettings)
    incidents: IncidentsSettings = Field(default_factory=IncidentsSettings)

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
        return f"config file {config} ([{'.'.join(path[:-1]) or 'top level'}] {path[-1]})"
    return "embedded default"


def _shown_value(loc: tuple[Any, ...], value: Any) -> str:
    secret_names = {"dsn", "url", "password", "secret_access_key", "access_key_id", "token"}
    if loc and str(loc[-1]) in secret_names and isinstance(value, str):
        return repr(mask_url(value))
    if isinstance(value, SecretStr):
        return "'**********'"
    shown = repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def load_settings(**overrides: Any) -> OpsSettings:
    """Load and validate the settings.

    Args:
        overrides: values that win over every other source (tests, and flows that take a settings
            section as a parameter).

    Returns:
        The frozen settings.

    Raises:
        SettingsError: a value is missing, of the wrong type or out of range; the message names each
            bad field, its (masked) value and its source, and says what form is expected.
    """
    try:
        return OpsSettings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            field = ".".join(str(p) for p in loc) or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            value = _shown_value(loc, error.get("input"))
            lines.append(f"- {field} = {value} from {_source_of(loc)}: {message}")
        raise SettingsError(
            "invalid settings; nothing was done. Fix these values and run again:\n" + "\n".join(lines)
        ) from None
