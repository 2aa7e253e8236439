"""Reports: markdown and table artifacts with stable keys, published also when a flow fails.

Rendering is plain functions (tested without Prefect); publishing needs a flow or task run and does
nothing outside one (a plain function called from a script has no run to attach an artifact to).
Every flow publishes its report, and its failure, one way: :func:`publishing`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from pydantic import BaseModel

from tasks.approvals import NOT_APPLIED
from tasks.errors import ApprovalRejected, LockBusy, ParameterError
from tasks.secrets import ERROR_TEXT_LIMIT, configured_secrets, mask_text, one_line, safe_error

_KEY_BAD = re.compile(r"[^a-z0-9-]+")


def artifact_key(*parts: str) -> str:
    """A stable artifact key from parts: lowercase letters, digits and dashes only."""
    key = "-".join(_KEY_BAD.sub("-", p.lower()).strip("-") for p in parts if p)
    return re.sub(r"-{2,}", "-", key).strip("-")[:100] or "report"


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines.extend("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)
    return "\n".join(lines)


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()`` reading), rounded to 0.01 ms."""
    return round((time.perf_counter() - started) * 1000, 2)


def in_run() -> bool:
    """Whether code runs inside a Prefect flow or task run."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _sync(created: UUID | Coroutine[Any, Any, UUID]) -> UUID:
    """The id an artifact call returned (from sync code Prefect's helpers return no coroutine)."""
    if not isinstance(created, UUID):
        raise TypeError(f"expected an artifact id from a synchronous call, got {type(created).__name__}")
    return created


def publish_markdown(key: str, markdown: str, description: str) -> UUID | None:
    """Publish (a new version of) the markdown artifact ``key``; nothing outside a run."""
    if not in_run():
        return None
    return _sync(create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description))


def publish_table(key: str, rows: Sequence[Mapping[str, Any]], description: str) -> UUID | None:
    """Publish (a new version of) the table artifact ``key``; nothing outside a run."""
    if not in_run():
        return None
    table = [{k: ("" if v is None else v) for k, v in row.items()} for row in rows]
    return _sync(create_table_artifact(table=table, key=artifact_key(key), description=description))


class Progress:
    """A progress artifact for long work; silent outside a run."""

    def __init__(self, key: str, description: str) -> None:
        self._id: UUID | None = None
        self._last = -1.0
        if in_run():
            self._id = _sync(
                create_progress_artifact(progress=0.0, key=artifact_key(key), description=description)
            )

    def update(self, percent: float) -> None:
        percent = max(0.0, min(100.0, percent))
        # Whole-percent steps: one API call per percent at most.
        if self._id is None or int(percent) == int(self._last):
            return
        self._last = percent
        update_progress_artifact(artifact_id=self._id, progress=percent)


# Errors that stop a run before it changes anything: its report says "not applied", not "failed".
REFUSALS: tuple[type[BaseException], ...] = (ApprovalRejected, LockBusy, ParameterError)


class RunReport(Protocol):
    """What :func:`publishing` fills in when a run fails: the headline outcome and the masked error."""

    outcome: str
    failure: str | None


Report = TypeVar("Report", bound=RunReport)


@dataclass
class RunOutcome:
    """The outcome and failure of a flow whose report is rendered from the flow's own variables."""

    outcome: str = "started"
    failure: str | None = None


@dataclass
class FailureReport:
    """The report of a flow that publishes its own report when it succeeds: a failure, if any.

    ``publish`` writes ``# <title>: **<outcome>**`` and the error to the flow's artifact key, and
    nothing when the run did not fail.
    """

    key: str
    title: str
    outcome: str = "started"
    failure: str | None = None

    def publish(self) -> None:
        """Publish the failure (a no-op for a run that did not fail)."""
        if self.failure is not None:
            publish_markdown(
                self.key,
                f"# {self.title}: **{self.outcome}**\n\n{self.failure}",
                f"{self.title}: {self.outcome}",
            )


def refusal(exc: BaseException, settings: BaseModel | None = None) -> str | None:
    """``not applied: ...`` for an error that refuses a run before any change; None for other errors."""
    if not isinstance(exc, REFUSALS):
        return None
    text = mask_text(one_line(str(exc), ERROR_TEXT_LIMIT), configured_secrets(settings)) or type(exc).__name__
    return text if text.startswith(NOT_APPLIED) else f"{NOT_APPLIED}: {text}"


class Publishing(Generic[Report]):
    """The context manager :func:`publishing` returns; it never swallows the error."""

    def __init__(
        self,
        report: Report,
        publish: Callable[[Report], object],
        settings: BaseModel | None,
        running: Collection[str],
        reported: tuple[type[BaseException], ...],
    ) -> None:
        self.report, self._publish, self._settings = report, publish, settings
        self._running, self._reported = running, reported

    def __enter__(self) -> Report:
        return self.report

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if exc is not None and not isinstance(exc, self._reported):
                if self.report.outcome in self._running:
                    self.report.outcome = refusal(exc, self._settings) or "failed"
                self.report.failure = self.report.failure or safe_error(exc, self._settings)
        finally:
            self._publish(self.report)


def publishing(
    report: Report,
    publish: Callable[[Report], object],
    settings: BaseModel | None = None,
    *,
    running: Collection[str] = ("started",),
    reported: tuple[type[BaseException], ...] = (),
) -> Publishing[Report]:
    """Run the body of a flow, then publish its report, also when the body fails.

    On an error the report gets the error (masked with :func:`tasks.secrets.safe_error`) as
    ``failure``, unless one is already recorded, and while its ``outcome`` is still one of
    ``running`` (the run had not reached a recorded result), a new outcome: ``not applied: ...``
    for a refusal (:data:`REFUSALS`: approval rejected or timed out, lock busy, bad parameter),
    else ``failed``. An outcome the flow set itself (``failed-restored``...) is kept. The error
    propagates unchanged.

    Args:
        report: the run's report, filled in by the body.
        publish: publishes the report (a Prefect task or a plain function); runs on the way out.
        settings: the secrets of these settings are masked in the error.
        running: the outcomes that mean "no result recorded yet".
        reported: errors the flow raises after publishing its own report of them; they are not
            recorded, so ``publish`` sees the report as the flow left it.

    Returns:
        A context manager whose ``as`` target is ``report``.

    Example:
        >>> with reports.publishing(report, publish_report, settings):  # doctest: +SKIP
        ...     report.outcome = do_the_work(report)
    """
    return Publishing(report, publish, settings, running, reported)
