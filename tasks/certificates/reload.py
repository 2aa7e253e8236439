"""Reload: make the TLS server load the renewed certificates, the way the settings name
(a local nginx, nginx in a Compose service, or a rollout restart on Kubernetes)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tasks.commands import run_command
from tasks.errors import CommandError, OpsError
from tasks.settings import OpsSettings


class ReloadFailed(OpsError):
    """The server could not be told to reload its certificates."""


@dataclass(frozen=True)
class ReloadRecord:
    """How the server was told to reload, and the commands run (the change record)."""

    method: str
    changed: bool
    commands: tuple[str, ...] = ()


def reload_commands(settings: OpsSettings) -> list[list[str]]:
    """The reload argvs for the ``nginx`` and ``compose`` methods (none for the others).

    Compose's default addresses the project the way the Compose runtime does (project name, files,
    env file, project directory from ``runtime.compose``), so ``exec`` finds the running container.
    """
    cfg = settings.certificates
    if cfg.reload_method == "nginx":
        return [list(cfg.reload_argv or ["nginx", "-s", "reload"])]
    if cfg.reload_method == "compose":
        if cfg.reload_argv:
            return [list(cfg.reload_argv)]
        base = _compose_base_argv(settings)
        return [[*base, "exec", "-T", service, "nginx", "-s", "reload"] for service in cfg.reload_services]
    return []


def _compose_base_argv(settings: OpsSettings) -> list[str]:
    """``docker compose`` with the project options the Compose runtime uses."""
    compose = settings.runtime.compose
    base = [*compose.command, "--project-name", compose.project or settings.stack]
    for path in compose.files:
        base += ["--file", os.fspath(path)]
    if compose.env_file is not None:
        base += ["--env-file", os.fspath(compose.env_file)]
    if compose.project_directory is not None:
        base += ["--project-directory", os.fspath(compose.project_directory)]
    return base


def reload_env(settings: OpsSettings) -> dict[str, str]:
    """Environment for the reload command: the Compose runtime's Docker Engine, when configured."""
    if settings.certificates.reload_method != "compose":
        return {}
    return settings.runtime.compose.docker_env()


def reload_server(settings: OpsSettings) -> ReloadRecord:
    """Make the TLS server load the renewed certificates, the way the settings name.

    ``nginx``: a local ``nginx -s reload``; ``compose``: ``docker compose exec nginx nginx -s reload``;
    ``kubernetes``: a rollout restart of the nginx Deployments through the runtime; ``none``: nothing
    (something else reloads; verification still checks what is served).

    Raises:
        ReloadFailed: the reload command or the restart failed.
    """
    cfg = settings.certificates
    if cfg.reload_method == "none":
        return ReloadRecord(method="none", changed=False)
    if cfg.reload_method == "kubernetes":
        return _restart_deployments(settings)
    return _run_reload_commands(settings)


def _restart_deployments(settings: OpsSettings) -> ReloadRecord:
    """A rollout restart of the reload services through the runtime, waiting until they are ready."""
    # The runtime pulls in the Kubernetes client: imported only when this method is used.
    from tasks.runtime import get_runtime

    cfg = settings.certificates
    try:
        runtime = get_runtime(settings)
        records = runtime.restart(list(cfg.reload_services))
        runtime.wait_ready(list(cfg.reload_services), timeout=cfg.reload_timeout_seconds)
    except OpsError as exc:
        raise ReloadFailed(
            f"rollout restart of {', '.join(cfg.reload_services)} failed: {exc}; the new certificate"
            " is on disk but not served yet"
        ) from None
    commands = tuple(c for r in records for c in r.commands) or tuple(
        f"rollout restart {r.target}" for r in records
    )
    return ReloadRecord(method="kubernetes", changed=True, commands=commands)


def _run_reload_commands(settings: OpsSettings) -> ReloadRecord:
    """Run each reload command (``nginx``, ``compose``), stopping at the first that fails."""
    cfg = settings.certificates
    ran = []
    for argv in reload_commands(settings):
        try:
            result = run_command(argv, env=reload_env(settings), timeout=cfg.reload_timeout_seconds)
        except CommandError as exc:
            raise ReloadFailed(
                f"reload with {' '.join(argv)} failed: {exc}; the new certificate is on disk but not"
                " served yet. Fix the server (nginx -t) and reload it"
            ) from None
        ran.append(result.command_line)
    return ReloadRecord(method=cfg.reload_method, changed=True, commands=tuple(ran))
