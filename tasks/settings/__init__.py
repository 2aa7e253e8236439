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

The model is split along its sections: :mod:`~tasks.settings.database` (postgres, redis, queue,
storage, backup, wal), :mod:`~tasks.settings.uploads`, :mod:`~tasks.settings.runtime` (compose,
kubernetes, runtime), :mod:`~tasks.settings.health` (health, diagnose), :mod:`~tasks.settings.migrations`,
:mod:`~tasks.settings.certificates`, :mod:`~tasks.settings.dependencies`, :mod:`~tasks.settings.incidents`,
:mod:`~tasks.settings.approvals`, :mod:`~tasks.settings.notifications` and
:mod:`~tasks.settings.scaling`; :mod:`~tasks.settings.model`
holds :class:`OpsSettings` and its sources, :mod:`~tasks.settings.names` the names that exist, and
:mod:`~tasks.settings.loading` :func:`load_settings` and its error message. Import from
``tasks.settings``: every public name is here.
"""

from __future__ import annotations

from tasks.settings.approvals import ApprovalSettings
from tasks.settings.base import CONFIG_ENV, DEFAULT_CONFIG_FILE, ENV_PREFIX, is_ambiguous_url
from tasks.settings.certificates import CertEndpoint, CertificatesSettings
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
from tasks.settings.loading import example_value, load_settings
from tasks.settings.migrations import MigrationsSettings
from tasks.settings.model import OpsSettings
from tasks.settings.names import (
    RESERVED_PREFIXES,
    RESERVED_VARIABLES,
    SettingField,
    setting_fields,
    unknown_variables,
)
from tasks.settings.notifications import ChannelSettings, NotificationsSettings, SmtpSettings
from tasks.settings.runtime import (
    DEFAULT_STATE_DIR,
    ComposeRuntimeSettings,
    KubernetesRuntimeSettings,
    RuntimeSettings,
)
from tasks.settings.scaling import ReplicaBounds, ScalingSettings
from tasks.settings.uploads import UploadsSettings

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_STATE_DIR",
    "ENV_PREFIX",
    "RESERVED_PREFIXES",
    "RESERVED_VARIABLES",
    "ApprovalSettings",
    "BackupSettings",
    "CertEndpoint",
    "CertificatesSettings",
    "ChannelSettings",
    "ComposeRuntimeSettings",
    "DependenciesSettings",
    "DiagnoseSettings",
    "HealthSettings",
    "IncidentsSettings",
    "KubernetesRuntimeSettings",
    "MigrationsSettings",
    "NotificationsSettings",
    "OpsSettings",
    "PostgresSettings",
    "QueueSettings",
    "RedisSettings",
    "ReplicaBounds",
    "RuntimeSettings",
    "ScalingSettings",
    "SettingField",
    "SmtpSettings",
    "StorageSettings",
    "UploadsSettings",
    "WalSettings",
    "example_value",
    "is_ambiguous_url",
    "load_settings",
    "setting_fields",
    "unknown_variables",
]
