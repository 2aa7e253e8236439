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


def get_runtime(settings: OpsSettings) -> Runtime:
    """The runtime the settings name. Heavy clients (docker, kubernetes) are imported only here."""
    if settings.runtime.kind == "none":
        return NoRuntime()
    raise RuntimeUnavailable(
        f"runtime kind {settings.runtime.kind!r} is not available in this build; use 'none'"
    )
