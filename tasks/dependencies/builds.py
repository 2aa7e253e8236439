"""Building the application's image from a working copy, tagged with a version derived from the change.

The build command is configurable (``dependencies.build_argv``, e.g. ``docker compose build`` with the
production compose file, which reads ``IMAGE_TAG``); the default is ``docker build -t IMAGE:TAG DIR``.
Docker is reached through the runtime settings' ``DOCKER_HOST`` when one is set. A build is proven by
the Docker Engine holding the tagged image afterwards, not by the build's exit code alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.commands import run_command
from tasks.errors import CommandError
from tasks.settings import OpsSettings

DEFAULT_BUILD_ARGV = ("docker", "build", "-t", "{ref}", "{context}")
_TAG_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class BuildFailed(CommandError):
    """The image build failed, or finished without leaving the tagged image in the engine."""


@dataclass(frozen=True)
class BuildResult:
    """The built image and the command that built it (masked)."""

    image: str
    tag: str
    image_id: str
    command: str
    duration_seconds: float

    @property
    def ref(self) -> str:
        return f"{self.image}:{self.tag}"


def tag_for_lockfile(lockfile: Path, prefix: str = "deps") -> str:
    """``deps-<first 12 hex of the lockfile's sha256>``: the same dependency set gets the same tag."""
    return f"{prefix}-{hashlib.sha256(lockfile.read_bytes()).hexdigest()[:12]}"


def build_command(settings: OpsSettings, context: Path, tag: str) -> list[str]:
    """The configured build argv with ``{image}``, ``{tag}``, ``{ref}`` and ``{context}`` filled in."""
    if not _TAG_OK.match(tag):
        raise ValueError(f"{tag!r} is not a valid image tag")
    image = settings.dependencies.image_name
    template = settings.dependencies.build_argv or list(DEFAULT_BUILD_ARGV)
    values = {"image": image, "tag": tag, "ref": f"{image}:{tag}", "context": str(context)}
    return [arg.format_map(values) for arg in template]


def _docker_env(settings: OpsSettings) -> dict[str, str]:
    env: dict[str, str] = {}
    compose = settings.runtime.compose
    if compose.docker_host:
        env["DOCKER_HOST"] = compose.docker_host
    if compose.docker_config:
        env["DOCKER_CONFIG"] = str(compose.docker_config)
    return env


def image_id(settings: OpsSettings, ref: str, timeout: float = 60.0) -> str | None:
    """The engine's id of ``ref``, or None when the engine has no such image."""
    result = run_command(
        ["docker", "image", "inspect", "--format", "{{.Id}}", ref],
        env=_docker_env(settings),
        timeout=timeout,
        check=False,
        log_output=False,
    )
    return result.stdout.strip() or None if result.ok else None


def build_image(settings: OpsSettings, context: Path, tag: str) -> BuildResult:
    """Build the image from ``context`` and check that the engine now holds ``image:tag``.

    Raises:
        BuildFailed: the build command failed or timed out, or left no ``image:tag`` behind (a
            ``build_argv`` that does not tag ``{ref}`` / read ``IMAGE_TAG``).
    """
    deps = settings.dependencies
    argv = build_command(settings, context, tag)
    env = {**_docker_env(settings), "IMAGE_NAME": deps.image_name, "IMAGE_TAG": tag}
    ref = f"{deps.image_name}:{tag}"
    try:
        result = run_command(argv, cwd=context, env=env, timeout=deps.build_timeout_seconds)
    except CommandError as exc:
        raise BuildFailed(f"building {ref} failed; nothing was deployed. {exc}") from None
    found = image_id(settings, ref)
    if found is None:
        raise BuildFailed(
            f"the build command finished but the Docker Engine has no image {ref}; make "
            "dependencies.build_argv tag '{ref}' (or use IMAGE_NAME/IMAGE_TAG in the compose file)"
        )
    return BuildResult(deps.image_name, tag, found, result.command_line, result.duration_seconds)


def docker_available(settings: OpsSettings) -> bool:
    """Whether a Docker Engine answers (``docker version``) where the runtime settings point."""
    try:
        result = run_command(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env=_docker_env(settings),
            timeout=20,
            check=False,
            log_output=False,
        )
    except CommandError:
        return False
    return result.ok and bool(result.stdout.strip())
