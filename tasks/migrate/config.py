"""The configured migration tool and the database it migrates: checks before any side effect, the
target, and the command tool's runner (its environment carries the target's DSN, masked in logs)."""

from __future__ import annotations

from pathlib import Path

from tasks import postgres
from tasks.commands import CommandResult, run_command
from tasks.errors import SettingsError
from tasks.migrate.model import HEAD
from tasks.secrets import configured_secrets
from tasks.settings import OpsSettings


def target_dsn(settings: OpsSettings) -> str:
    """The DSN of the database the migrations run against (a secret: never log it)."""
    return settings.postgres.dsn.get_secret_value()


def dsn_secrets(settings: OpsSettings) -> list[str]:
    """Every secret of the settings (the target's DSN in each form, its password...), for masking
    command lines and output."""
    return configured_secrets(settings)


def target_database(settings: OpsSettings) -> str:
    """The database the migrations run against."""
    return postgres.database_name(target_dsn(settings))


def require_configured(settings: OpsSettings) -> None:
    """Fail before any side effect when the migration tool is not configured.

    Raises:
        SettingsError: names the missing settings.
    """
    cfg = settings.migrations
    if cfg.tool == "alembic":
        if not cfg.script_location and not cfg.alembic_config:
            raise SettingsError(
                "migrations.tool is 'alembic' but neither migrations.script_location nor"
                " migrations.alembic_config is set; set OPS_MIGRATIONS__SCRIPT_LOCATION to the app's"
                " Alembic directory (the one with env.py)"
            )
        if cfg.alembic_config and not Path(cfg.alembic_config).is_file():
            raise SettingsError(f"migrations.alembic_config {cfg.alembic_config} is not a readable file")
        location = cfg.script_location
        if location and ":" not in location and not (Path(location) / "env.py").is_file():
            raise SettingsError(f"migrations.script_location {location} has no env.py")
    elif cfg.cwd is not None and not Path(cfg.cwd).is_dir():
        raise SettingsError(f"migrations.cwd {cfg.cwd} is not a directory")


def is_head(target: str) -> bool:
    """Whether ``target`` means every pending migration."""
    return target in (HEAD, "heads")


def target_argv(settings: OpsSettings, target: str) -> list[str]:
    """The command tool's apply argv for ``target`` (the plain apply for ``head``)."""
    if is_head(target):
        return list(settings.migrations.apply_argv)
    return [a.replace("{target}", target) for a in settings.migrations.apply_target_argv]


def run_tool(settings: OpsSettings, argv: list[str], what: str, *, check: bool) -> CommandResult:
    """Run the command tool's ``argv`` (``what`` is ``status`` or ``apply``, which picks the timeout)."""
    cfg = settings.migrations
    env = dict(cfg.env)
    if cfg.database_url_env:
        env[cfg.database_url_env] = postgres.libpq_dsn(target_dsn(settings))
    timeout = cfg.apply_timeout_seconds if what == "apply" else cfg.status_timeout_seconds
    secrets = dsn_secrets(settings)
    return run_command(argv, timeout=timeout, cwd=cfg.cwd, env=env, secrets=secrets, check=check)
