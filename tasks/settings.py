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


class UploadsSettings(_Section):
    """The application's uploads directory."""

    root: Path = Path("./var/uploads")
    expected_owner: str | None = Field(default=None, description="user that must own the uploads root")
    expected_mode: str | None = Field(default=None, description="octal mode the root must have, e.g. '0755'")


class RuntimeSettings(_Section):
    """Where the application's services run."""

    kind: Literal["compose", "kubernetes", "none"] = "none"
    services: list[str] = Field(default_factory=lambda: ["backend", "worker"])


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
