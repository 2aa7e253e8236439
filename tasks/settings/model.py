"""The settings model, :class:`OpsSettings`, and its sources: environment, TOML file, defaults."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tasks.errors import SettingsError
from tasks.settings.approvals import ApprovalSettings
from tasks.settings.base import CONFIG_ENV, DEFAULT_CONFIG_FILE, ENV_PREFIX
from tasks.settings.certificates import CertificatesSettings
from tasks.settings.database import (
    BackupSettings,
    PostgresSettings,
    QueueSettings,
    RedisSettings,
    StorageSettings,
    WalSettings,
)
from tasks.settings.dependencies import DependenciesSettings
from tasks.settings.health import DiagnoseSettings, HealthSettings
from tasks.settings.incidents import IncidentsSettings
from tasks.settings.migrations import MigrationsSettings
from tasks.settings.notifications import NotificationsSettings
from tasks.settings.runtime import RuntimeSettings
from tasks.settings.scaling import ScalingSettings
from tasks.settings.uploads import UploadsSettings


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
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

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
