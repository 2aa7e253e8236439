"""Where the application's services run: the ``Runtime`` protocol and the runtime chosen by settings.

Flows talk to a ``Runtime`` and never branch on its kind. ``NoRuntime`` serves a stack whose services
this tool does not manage (``runtime.kind = "none"``): reads answer with nothing, and every operation
that would change a service fails with an error that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

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


def image_with_tag(image: str, tag: str) -> str:
    """``image`` (``registry:5000/app:v1``, ``app@sha256:...``) with its tag or digest replaced by ``tag``."""
    if not tag or any(c in tag for c in "/:@ "):
        raise ValueError(f"{tag!r} is not an image tag (letters, digits, '.', '-', '_')")
    repository = image.split("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    if ":" in last:
        repository = repository[: len(repository) - len(last)] + last.split(":", 1)[0]
    return f"{repository}:{tag}"


def not_ready_summary(statuses: Sequence[ServiceStatus]) -> str:
    """``backend 0/1 (exited), worker 1/1`` for error messages and reports."""
    return ", ".join(f"{s.name} {s.ready}/{s.desired} ({s.state})" for s in statuses) or "no services"


@runtime_checkable
class Runtime(Protocol):
    """Operations every runtime provides (Compose and Kubernetes implement it; ``NoRuntime`` refuses)."""

    kind: str

    def list_services(self) -> list[ServiceStatus]: ...

    def logs(self, service: str, tail: int = 100) -> str: ...

    def resource_usage(self) -> list[ResourceUsage]: ...

    def restart(self, services: Sequence[str]) -> list[ChangeRecord]: ...

    def scale(self, service: str, replicas: int) -> ChangeRecord: ...

    def set_images(self, images: dict[str, str]) -> list[ChangeRecord]: ...

    def wait_ready(self, services: Sequence[str], timeout: float) -> list[ServiceStatus]: ...

    def history(self, service: str) -> list[Revision]: ...

    def rollback(self, service: str, revision: str | None = None) -> ChangeRecord: ...


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


def get_runtime(settings: OpsSettings) -> Runtime:
    """The runtime the settings name. Heavy clients (docker, kubernetes) are imported only here.

    Raises:
        RuntimeUnavailable: the runtime's API cannot be reached or configured.
    """
    kind = settings.runtime.kind
    if kind == "compose":
        from tasks.compose import ComposeRuntime

        return ComposeRuntime(settings)
    if kind == "kubernetes":
        from tasks.kubernetes import KubernetesRuntime

        return KubernetesRuntime(settings)
    return NoRuntime()
