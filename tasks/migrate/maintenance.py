"""The application's maintenance mode, switched with the configured command or HTTP call
(``migrations.maintenance_*``): the scheduled-downtime flow uses it, and it stops the writers for a
migration's window when configured."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.commands import run_command
from tasks.migrate.config import dsn_secrets
from tasks.migrate.model import MigrationError
from tasks.settings import OpsSettings


@dataclass(frozen=True)
class MaintenanceChange:
    """Change record of turning the application's maintenance mode on or off."""

    mode: str
    configured: bool
    changed: bool
    method: str
    detail: str
    commands: tuple[str, ...] = field(default_factory=tuple)


def set_maintenance_mode(settings: OpsSettings, on: bool, *, dry_run: bool) -> MaintenanceChange:
    """Turn the application's maintenance mode on or off with the configured command or HTTP call.

    With nothing configured, nothing happens and the record says so (the app stays reachable).

    Raises:
        CommandError: the command failed. httpx.HTTPError / MigrationError: the HTTP call failed.
    """
    cfg = settings.migrations
    mode = "on" if on else "off"
    argv = cfg.maintenance_on_argv if on else cfg.maintenance_off_argv
    url = cfg.maintenance_on_url if on else cfg.maintenance_off_url
    if not argv and not url:
        return MaintenanceChange(
            mode,
            configured=False,
            changed=False,
            method="none",
            detail="no maintenance mode is configured (migrations.maintenance_*): the application stays"
            " reachable during the window",
        )
    if argv:
        if dry_run:
            return MaintenanceChange(mode, True, False, "command", "dry run: would run", (" ".join(argv),))
        result = run_command(argv, timeout=cfg.maintenance_timeout_seconds, secrets=dsn_secrets(settings))
        return MaintenanceChange(
            mode, True, True, "command", f"exited {result.returncode}", (result.command_line,)
        )
    assert url is not None
    from tasks.secrets import mask_url

    shown = f"{cfg.maintenance_http_method} {mask_url(url)}"
    if dry_run:
        return MaintenanceChange(mode, True, False, "http", "dry run: would call", (shown,))
    import httpx

    response = httpx.request(cfg.maintenance_http_method, url, timeout=cfg.maintenance_timeout_seconds)
    if not response.is_success:
        raise MigrationError(
            f"maintenance mode {mode}: {shown} answered HTTP {response.status_code}; check the endpoint"
        )
    return MaintenanceChange(mode, True, True, "http", f"HTTP {response.status_code}", (shown,))
