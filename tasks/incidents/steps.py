"""Step timings of the incident flows: when each step started, how long it took, how it ended; and the
approval timeout they share."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from tasks.errors import ParameterError
from tasks.secrets import safe_error
from tasks.settings import OpsSettings


def approval_timeout(settings: OpsSettings, override: int | None) -> int:
    """How long an incident flow's approval form waits: ``override``, else
    ``incidents.approval_timeout_seconds``.

    Raises:
        ParameterError: ``override`` is not positive.
    """
    if override is not None and override <= 0:
        raise ParameterError("approval_timeout_seconds must be positive")
    return override or int(settings.incidents.approval_timeout_seconds)


@dataclass
class Step:
    """One step of an incident flow: when it started, how long it took, how it ended."""

    name: str
    started_at: datetime
    duration_seconds: float = 0.0
    outcome: Literal["ok", "failed", "skipped", "running"] = "running"
    detail: str = ""

    def as_row(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "duration_s": round(self.duration_seconds, 3),
            "outcome": self.outcome,
            "detail": self.detail,
        }


@dataclass
class StepLog:
    """The steps of a run in order; a failing step is recorded with its (masked) error and re-raised."""

    secrets: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        current = Step(name=name, started_at=datetime.now(UTC))
        self.steps.append(current)
        started = time.monotonic()
        try:
            yield current
        except BaseException as exc:
            current.outcome = "failed"
            current.detail = safe_error(exc, extra=self.secrets)
            raise
        finally:
            current.duration_seconds = time.monotonic() - started
        current.outcome = "ok"

    def skip(self, name: str, why: str) -> None:
        self.steps.append(Step(name, datetime.now(UTC), 0.0, "skipped", why))

    def rows(self) -> list[dict[str, Any]]:
        return [s.as_row() for s in self.steps]
