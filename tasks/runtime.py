"""Where the application's services run: the ``Runtime`` protocol and the runtime chosen by settings.

Flows talk to a ``Runtime`` and never branch on its kind. ``NoRuntime`` serves a stack whose services
this tool does not manage (``runtime.kind = "none"``): reads answer with nothing, and every operation
that would change a service fails with an error that says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from tasks.errors import OpsError
from tasks.settings import OpsSettings


class RuntimeUnavailable(OpsError):
    """The configured runtime cannot do this (no runtime configured, or the API is unreachable)."""


class RuntimeOperationFailed(OpsError):
    """A runtime operation was refused or failed (unknown service, image that cannot be pulled...)."""


class ServicesNotReady(OpsError):
    """Services did not become ready within the timeout; ``statuses`` holds what was seen last."""

    def __init__(self, message: str, statuses: Sequence[ServiceStatus] = ()) -> None:
        super().__init__(message)
        self.statuses = list(statuses)


@dataclass(frozen=True)
class ServiceStatus:
    """One service (Compose service or Kubernetes Deployment) as the runtime sees it."""

    name: str
    image: str | None
    desired: int
    ready: int
    state: str
    restarts: int = 0
    started_at: datetime | None = None
    revision: str | None = None

    @property
    def healthy(self) -> bool:
        return self.desired > 0 and self.ready >= self.desired


@dataclass(frozen=True)
class ResourceUsage:
    """CPU and memory of one service, when the platform can tell."""

    name: str
    cpu_percent: float | None
    memory_bytes: int | None
    available: bool = True
    note: str | None = None


@dataclass(frozen=True)
class ChangeRecord:
    """What a mutating runtime operation changed and the commands it ran (secrets masked)."""

    operation: str
    target: str
    changed: bool
    before: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    commands: tuple[str, ...] = ()


@dataclass(frozen=True)
class Revision:
    """One entry of a service's rollout history (a ReplicaSet revision, or a recorded release)."""

    service: str
    revision: str
    images: dict[str, str]
    created_at: datetime | None = None
    current: bool = False
    note: str | None = None


@dataclass(frozen=True)
class IsolationPlan:
    """What blocking external traffic to the services changes, and the state before it.

    Made by :meth:`Runtime.plan_isolation` from what runs now (a dry run shows exactly this plan);
    ``state`` is the runtime's own JSON-serialisable data: what it applies and what was there before,
    which :meth:`Runtime.end_isolation` puts back. It is recorded before anything changes.
    """

    runtime: str
    services: tuple[str, ...]
    actions: tuple[str, ...]
    undo: tuple[str, ...]
    state: dict[str, Any] = field(default_factory=dict)
    # Services the isolation takes out of service: nothing may start them again until it ends.
    stopped_services: tuple[str, ...] = ()
    # What the plan found and leaves alone (an entry service that was not running...).
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON data (the isolation record keeps it)."""
        return {
            "runtime": self.runtime,
            "services": list(self.services),
            "actions": list(self.actions),
            "undo": list(self.undo),
            "state": self.state,
            "stopped_services": list(self.stopped_services),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IsolationPlan:
        """The plan :meth:`as_dict` wrote."""
        return cls(
            runtime=str(data["runtime"]),
            services=tuple(data.get("services") or ()),
            actions=tuple(data.get("actions") or ()),
            undo=tuple(data.get("undo") or ()),
            state=dict(data.get("state") or {}),
            stopped_services=tuple(data.get("stopped_services") or ()),
            notes=tuple(data.get("notes") or ()),
        )


# The OCI / distribution reference grammar (github.com/distribution/reference, OCI distribution spec):
# anything else is refused before it reaches a Compose file, a command line or a Kubernetes patch.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"(?P<algorithm>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<hex>[a-fA-F0-9]{32,})")
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[A-Fa-f0-9:]+\])(?::[0-9]+)?")
# Registered algorithms have a fixed length (OCI image spec, "Digests").
_DIGEST_LENGTHS = {"sha256": 64, "sha512": 128}
_NAME_MAX = 255
_TAG_FORM = "1 to 128 of letters, digits, '_', '.', '-', not starting with '.' or '-'"


def _shown(value: str) -> str:
    return repr(value[:200])


def check_image_tag(tag: str) -> str:
    """``tag`` when it is an image tag (``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``) or a digest.

    Raises:
        ValueError: anything else (``1.0;id``, ``$(id)``, ``-rf``, a newline...), saying what is valid.
    """
    if not isinstance(tag, str) or not (_TAG.fullmatch(tag) or _check_digest(tag)):
        raise ValueError(
            f"{_shown(str(tag))} is not an image tag ({_TAG_FORM}, e.g. 1.4.2) nor a digest"
            " (algorithm:hex, e.g. sha256:<64 hex digits>)"
        )
    return tag


def _check_digest(digest: str) -> bool:
    match = _DIGEST.fullmatch(digest)
    if match is None:
        return False
    length = _DIGEST_LENGTHS.get(match["algorithm"])
    return length is None or len(match["hex"]) == length


def check_image_reference(reference: str) -> str:
    """``reference`` when it is a valid image reference: ``[registry[:port]/]repository[:tag][@digest]``.

    The repository is lowercase path components (``team/app``) separated by ``.``, ``_``, ``__`` or
    dashes; the first component is a registry when it holds a ``.`` or a ``:`` or is ``localhost``.

    Raises:
        ValueError: the reference does not follow the grammar; the message says which part and why.
    """
    if not isinstance(reference, str) or not reference:
        raise ValueError("an image reference must not be empty (e.g. registry.example.com/team/app:1.4.2)")
    name, at, digest = reference.partition("@")
    if at and not _check_digest(digest):
        raise ValueError(
            f"image {_shown(reference)}: {_shown(digest)} is not a digest"
            " (algorithm:hex, e.g. sha256:<64 hex digits>)"
        )
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name[: len(name) - len(last)] + last.split(":", 1)[0], last.split(":", 1)[1]
        if not _TAG.fullmatch(tag):
            raise ValueError(f"image {_shown(reference)}: {_shown(tag)} is not a tag ({_TAG_FORM})")
    domain, slash, remainder = name.partition("/")
    if slash and ("." in domain or ":" in domain or domain == "localhost"):
        if not _DOMAIN.fullmatch(domain):
            raise ValueError(
                f"image {_shown(reference)}: {_shown(domain)} is not a registry host[:port]"
                " (e.g. registry.example.com:5000)"
            )
        repository = remainder
    else:
        repository = name
    if not _REPOSITORY.fullmatch(repository):
        raise ValueError(
            f"image {_shown(reference)}: {_shown(repository)} is not a repository name (lowercase"
            " letters and digits, components separated by '/', '.', '_', '__' or '-', e.g. team/app)"
        )
    if len(name) > _NAME_MAX:
        raise ValueError(f"image {_shown(reference)}: the name is longer than {_NAME_MAX} characters")
    return reference


def image_with_tag(image: str, tag: str) -> str:
    """``image`` (``registry:5000/app:v1``, ``app@sha256:...``) with its tag or digest replaced by ``tag``.

    ``tag`` may be a digest (``sha256:...``): the result is then ``repository@digest``.

    Raises:
        ValueError: ``tag`` is not a tag nor a digest, or the result is not a valid image reference.
    """
    check_image_tag(tag)
    repository = image.split("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    if ":" in last:
        repository = repository[: len(repository) - len(last)] + last.split(":", 1)[0]
    separator = "@" if ":" in tag else ":"
    return check_image_reference(f"{repository}{separator}{tag}")


def not_ready_summary(statuses: Sequence[ServiceStatus]) -> str:
    """``backend 0/1 (exited), worker 1/1`` for error messages and reports."""
    return ", ".join(f"{s.name} {s.ready}/{s.desired} ({s.state})" for s in statuses) or "no services"


# Exit status of a command that could not be started in the container (the shell's "not found").
EXIT_NOT_FOUND = 127


@dataclass(frozen=True)
class ExecResult:
    """A command run inside one running container or pod of a service, and how it ended.

    ``exit_code`` is None when the command was still running at the timeout (it is left to end by its
    own time limits); a command the container does not have ends with :data:`EXIT_NOT_FOUND`.
    """

    service: str
    instance: str
    argv: tuple[str, ...]
    exit_code: int | None
    stdout: str = ""
    stderr: str = ""

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None

    @property
    def not_found(self) -> bool:
        return self.exit_code == EXIT_NOT_FOUND


# A service's good recorded releases as revisions, oldest first: the history of a runtime that keeps
# none of its own (Compose). The release records provide it (tasks.releases.release_history).
ReleaseHistory = Callable[[str], list[Revision]]


@runtime_checkable
class Runtime(Protocol):
    """Operations every runtime provides (Compose and Kubernetes implement it; ``NoRuntime`` refuses).

    Every method may raise :class:`RuntimeUnavailable` when the runtime's API cannot be reached or is
    not configured (the Docker socket, the Kubernetes API, ``runtime.kind = "none"`` for changes);
    the errors below are the ones each method adds. Mutating methods return change records saying
    what changed and the commands they ran (secrets masked); running one twice changes nothing the
    second time where the operation allows.
    """

    kind: str

    def list_services(self) -> list[ServiceStatus]:
        """Every configured service with image, replicas ready/desired, state and start time.

        A configured service that does not exist is listed with state ``missing``, not raised.
        """
        ...

    def logs(self, service: str, tail: int = 100) -> str:
        """The last ``tail`` lines of the service's logs (every replica's, each headed by its name).

        Raises:
            RuntimeOperationFailed: the service does not exist.
        """
        ...

    def resource_usage(self) -> list[ResourceUsage]:
        """CPU and memory per service; ``available=False`` with a note where the platform cannot tell."""
        ...

    def restart(self, services: Sequence[str]) -> list[ChangeRecord]:
        """Restart the services (``compose restart``; ``rollout restart``), one record each.

        Raises:
            RuntimeOperationFailed: a service does not exist or the restart was refused.
        """
        ...

    def scale(self, service: str, replicas: int) -> ChangeRecord:
        """Set the service's replica count (0 stops it); does not wait.

        Raises:
            RuntimeOperationFailed: the service does not exist or cannot be scaled.
        """
        ...

    def set_images(self, images: dict[str, str]) -> list[ChangeRecord]:
        """Run each service on the given image (a service already on it is left alone); does not wait.

        Raises:
            RuntimeOperationFailed: a service does not exist, or the runtime refused the image.
        """
        ...

    def wait_ready(self, services: Sequence[str], timeout: float) -> list[ServiceStatus]:
        """Wait until every service is ready (the runtime's own readiness), then their statuses.

        Raises:
            ServicesNotReady: not ready within ``timeout`` (or the rollout failed, e.g. an image that
                cannot be pulled); its ``statuses`` hold what was seen last.
        """
        ...

    def history(self, service: str) -> list[Revision]:
        """The service's rollout history, oldest first (ReplicaSet revisions; recorded releases)."""
        ...

    def rollback(self, service: str, revision: str | None = None) -> ChangeRecord:
        """Return the service to ``revision`` (default: the one before the current); does not wait.

        Raises:
            RuntimeOperationFailed: no such revision, or nothing to return to.
        """
        ...

    def single_replica_reason(self, service: str) -> str | None:
        """Why ``service`` cannot run more than one replica (a fixed host port, a fixed container
        name), or None when nothing in its definition prevents it. Reads only.

        Raises:
            RuntimeOperationFailed: the service does not exist.
        """
        ...

    def exec(self, service: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """Run ``argv`` (no shell, no stdin, no TTY) in one running container or pod of the service.

        Read-only use only (diagnostics): the command runs with the service's own rights. Waits at
        most ``timeout`` seconds; a command still running then is reported with ``exit_code`` None.

        Raises:
            RuntimeOperationFailed: the service does not exist or has no running container or pod.
        """
        ...

    # -- isolation (security incident): block external traffic, and put back what was there ----------

    def plan_isolation(self, services: Sequence[str] | None = None) -> IsolationPlan:
        """What blocking external traffic would change, read from what runs now; changes nothing.

        ``services``: the services to cut off; default every service of the namespace (Kubernetes)
        or the public entry services (Compose, ``runtime.compose.public_entry_services``).

        Raises:
            RuntimeOperationFailed: an unknown service, no public entry service configured, or an
                object in the way that this tool did not make.
        """
        ...

    def isolate(self, plan: IsolationPlan) -> list[ChangeRecord]:
        """Apply ``plan`` (record it first: its ``state`` is what :meth:`end_isolation` restores).

        Raises:
            RuntimeOperationFailed: the change was refused or did not take effect.
        """
        ...

    def end_isolation(self, plan: IsolationPlan) -> list[ChangeRecord]:
        """Put back exactly what ``plan`` recorded; also after a partly applied isolation.

        Raises:
            RuntimeOperationFailed: the recorded state could not be restored (the message says what).
        """
        ...


class NoRuntime:
    """``runtime.kind = "none"``: the services are not managed by this tool."""

    kind = "none"

    def list_services(self) -> list[ServiceStatus]:
        return []

    def logs(self, service: str, tail: int = 100) -> str:
        return ""

    def resource_usage(self) -> list[ResourceUsage]:
        return []

    def _refuse(self, what: str) -> RuntimeUnavailable:
        return RuntimeUnavailable(
            f"cannot {what}: runtime.kind is 'none'; set OPS_RUNTIME__KIND to 'compose' or 'kubernetes'"
        )

    def restart(self, services: Sequence[str]) -> list[ChangeRecord]:
        raise self._refuse(f"restart {', '.join(services)}")

    def scale(self, service: str, replicas: int) -> ChangeRecord:
        raise self._refuse(f"scale {service}")

    def set_images(self, images: dict[str, str]) -> list[ChangeRecord]:
        raise self._refuse("set images")

    def wait_ready(self, services: Sequence[str], timeout: float) -> list[ServiceStatus]:
        raise self._refuse("wait for services")

    def history(self, service: str) -> list[Revision]:
        return []

    def rollback(self, service: str, revision: str | None = None) -> ChangeRecord:
        raise self._refuse(f"roll back {service}")

    def single_replica_reason(self, service: str) -> str | None:
        return None

    def exec(self, service: str, argv: Sequence[str], timeout: float) -> ExecResult:
        raise self._refuse(f"run commands inside {service}")

    def plan_isolation(self, services: Sequence[str] | None = None) -> IsolationPlan:
        raise self._refuse("block external traffic")

    def isolate(self, plan: IsolationPlan) -> list[ChangeRecord]:
        raise self._refuse("block external traffic")

    def end_isolation(self, plan: IsolationPlan) -> list[ChangeRecord]:
        raise self._refuse("end an isolation")


def get_runtime(settings: OpsSettings) -> Runtime:
    """The runtime the settings name. Heavy clients (docker, kubernetes) are imported only here.

    Raises:
        RuntimeUnavailable: the runtime's API cannot be reached or configured.
    """
    kind = settings.runtime.kind
    if kind == "compose":
        from tasks.compose import ComposeRuntime
        from tasks.releases import release_history

        return ComposeRuntime(settings, release_history(settings))
    if kind == "kubernetes":
        from tasks.kubernetes import KubernetesRuntime

        return KubernetesRuntime(settings)
    return NoRuntime()
