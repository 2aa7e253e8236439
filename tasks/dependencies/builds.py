"""Building the application's image from a working copy, tagged with a version derived from the change.

The build command is configurable (``dependencies.build_argv``, e.g. ``docker compose build`` with the
production compose file, which reads ``IMAGE_TAG``); the default is ``docker build -t IMAGE:TAG DIR``.
Docker is reached through the runtime settings' ``DOCKER_HOST`` when one is set. A build is proven by
the Docker Engine holding the tagged image afterwards, not by the build's exit code alone. Before a
build meant for staging, :func:`check_staging_image` checks that the services run the repository the
build will tag (deploy-release switches each service to the new tag of its own repository).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.commands import run_command
from tasks.errors import CommandError, SettingsError
from tasks.runtime import ServiceStatus, get_runtime
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


def image_id(settings: OpsSettings, ref: str, timeout: float = 60.0) -> str | None:
    """The engine's id of ``ref``, or None when the engine has no such image."""
    result = run_command(
        ["docker", "image", "inspect", "--format", "{{.Id}}", ref],
        env=settings.runtime.compose.docker_env(),
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
    env = {**settings.runtime.compose.docker_env(), "IMAGE_NAME": deps.image_name, "IMAGE_TAG": tag}
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
            env=settings.runtime.compose.docker_env(),
            timeout=20,
            check=False,
            log_output=False,
        )
    except CommandError:
        return False
    return result.ok and bool(result.stdout.strip())


_DOCKER_HUB_PREFIXES = ("docker.io/", "index.docker.io/", "registry-1.docker.io/")


def image_repository(image: str) -> str:
    """The repository of an image reference as the engine resolves it: tag and digest dropped, Docker
    Hub's implicit registry and ``library/`` removed (``docker.io/library/nginx:1`` -> ``nginx``);
    ``registry:5000/app:v1`` -> ``registry:5000/app``."""
    repository = image.split("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    if ":" in last:
        repository = repository[: len(repository) - len(last)] + last.split(":", 1)[0]
    for prefix in _DOCKER_HUB_PREFIXES:
        if repository.startswith(prefix):
            repository = repository[len(prefix) :]
            break
    if repository.startswith("library/") and repository.count("/") == 1:
        repository = repository[len("library/") :]
    return repository


def _and(names: Sequence[str]) -> str:
    return " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]


def _run(names: Sequence[str]) -> str:
    return "runs" if len(names) == 1 else "run"


def check_image_against_services(
    image_name: str, services: Sequence[str], statuses: Sequence[ServiceStatus], environment: str
) -> None:
    """Refuse an ``image_name`` that is not the repository every one of ``services`` runs.

    deploy-release applies the built tag to each service's *current* image (``app:v1`` ->
    ``app:deps-...``), so a build under another repository name would deploy a tag that repository
    does not have, or another image of the same tag.

    Raises:
        SettingsError: a service runs no image, or another repository; the message names the
            services, what they run and the setting that would match.
    """
    seen = {s.name: s.image for s in statuses}
    missing = [s for s in services if not seen.get(s)]
    if missing:
        raise SettingsError(
            f"on {environment}, {_and(missing)} {_run(missing)} no image now (runtime.services: "
            f"{', '.join(services)}), so deploy-release cannot apply the built tag to them; start them, "
            "list only the app's services in OPS_RUNTIME__SERVICES, or pass deploy_to_staging=false. "
            "Nothing was built or deployed."
        )
    running = {s: image_repository(str(seen[s])) for s in services}
    wanted = image_repository(image_name)
    if all(repository == wanted for repository in running.values()):
        return
    groups: dict[str, list[str]] = {}
    for service, repository in running.items():
        groups.setdefault(repository, []).append(service)
    what = "; ".join(f"{_and(names)} {_run(names)} {repository}" for repository, names in groups.items())
    if len(groups) == 1:
        hint = f"set OPS_DEPENDENCIES__IMAGE_NAME={next(iter(groups))} (the repository the build must tag)"
    else:
        hint = (
            "deploy-release applies one tag to every service, so they must run one repository: list only"
            " those in OPS_RUNTIME__SERVICES, or pass deploy_to_staging=false"
        )
    raise SettingsError(
        f"dependencies.image_name (OPS_DEPENDENCIES__IMAGE_NAME) is {image_name!r}, but on {environment} "
        f"{what}: the build would tag {wanted} and deploy-release would switch the services to a tag of "
        f"their own repository, which this run does not build. {hint}. Nothing was built or deployed."
    )


def check_staging_image(settings: OpsSettings) -> list[ServiceStatus]:
    """Read the services the runtime runs now and check that they run ``dependencies.image_name``.

    Returns:
        The services' statuses as read.

    Raises:
        SettingsError: see :func:`check_image_against_services`.
        RuntimeUnavailable: the runtime's API cannot be reached.
    """
    services = list(settings.runtime.services)
    statuses = get_runtime(settings).list_services()
    check_image_against_services(
        settings.dependencies.image_name, services, statuses, settings.runtime.environment
    )
    return [s for s in statuses if s.name in services]
