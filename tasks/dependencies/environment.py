"""How npm and git run for one update: the scopes and constants, the errors, and npm's environment.

npm runs with a userconfig of our own in the run directory (never the operator's ``~/.npmrc``): the
registry URL and its token come from settings, the token through an environment variable, so it is
masked in every log, record and error. Every command runs through :mod:`tasks.commands` with its own
timeout.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from tasks.commands import CommandResult, run_command
from tasks.errors import CheckFailed, CommandError, OpsError
from tasks.settings import DependenciesSettings

Scope = Literal["security", "minor", "latest"]
SCOPES: tuple[str, ...] = ("security", "minor", "latest")
SEVERITIES: tuple[str, ...] = ("critical", "high", "moderate", "low", "info")
LOCKFILES: tuple[str, ...] = ("package-lock.json", "npm-shrinkwrap.json")
TOKEN_ENV = "NPM_REGISTRY_TOKEN"  # noqa: S105 - the name of the variable, not a token


class DependencyError(OpsError):
    """npm or git could not do what the update needs; the message says which step and what to do."""


class TestsFailed(CheckFailed):
    """The application's tests failed on the updated dependencies; nothing was built or deployed."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class NpmEnvironment:
    """How npm and git run for one update: variables, secrets to mask, timeouts, git identity."""

    env: dict[str, str] = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)
    settings: DependenciesSettings

    def npm(self, args: Sequence[str], cwd: Path, timeout: float, *, check: bool = True) -> CommandResult:
        return run_command(
            ["npm", *args], cwd=cwd, env=self.env, secrets=self.secrets, timeout=timeout, check=check
        )

    def git(self, args: Sequence[str], cwd: Path | None, *, check: bool = True) -> CommandResult:
        identity = [
            "-c",
            f"user.name={self.settings.git_author_name}",
            "-c",
            f"user.email={self.settings.git_author_email}",
            "-c",
            "commit.gpgsign=false",
        ]
        return run_command(
            ["git", *identity, *args],
            cwd=cwd,
            env={"GIT_TERMINAL_PROMPT": "0"},
            timeout=self.settings.git_timeout_seconds,
            check=check,
        )


def npm_environment(settings: DependenciesSettings, run_dir: Path) -> NpmEnvironment:
    """Write the run's own npm userconfig into ``run_dir`` and return the environment that uses it.

    The token is never written to disk: the userconfig refers to ``${NPM_REGISTRY_TOKEN}``, which npm
    expands from the environment (and the command runner masks, as its name says TOKEN).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    env = {
        "npm_config_userconfig": str(run_dir / "npmrc"),
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        # Installs do not audit on their own: the audit is an explicit, reported step.
        "npm_config_audit": "false",
        "npm_config_yes": "false",
    }
    secrets: list[str] = []
    if settings.registry_url:
        url = settings.registry_url if settings.registry_url.endswith("/") else settings.registry_url + "/"
        lines.append(f"registry={url}")
        # The environment beats a project .npmrc, so the configured registry wins over a committed one.
        env["npm_config_registry"] = url
        if settings.registry_token is not None:
            parts = urlsplit(url)
            lines.append(f"//{parts.netloc}{parts.path}:_authToken=${{{TOKEN_ENV}}}")
            token = settings.registry_token.get_secret_value()
            env[TOKEN_ENV] = token
            secrets.append(token)
    if settings.npm_cache_dir is not None:
        env["npm_config_cache"] = str(settings.npm_cache_dir)
    (run_dir / "npmrc").write_text("\n".join(lines) + "\n")
    return NpmEnvironment(env=env, secrets=tuple(secrets), settings=settings)


def json_output(result: CommandResult, what: str) -> Any:
    """The JSON an npm command printed (``{}`` when it printed nothing).

    Raises:
        DependencyError: the command printed something that is not JSON; the message holds its tail.
    """
    text = result.stdout.strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DependencyError(
            f"{what} printed no JSON (exit {result.returncode}):\n{(result.stderr or text)[-2000:]}"
        ) from None


def ensure_tools() -> None:
    """Fail before any side effect when npm or git is missing."""
    missing = [tool for tool in ("npm", "node", "git") if shutil.which(tool) is None]
    if missing:
        raise CommandError(f"{', '.join(missing)} not found on PATH; install Node.js, npm and git")
