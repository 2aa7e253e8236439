"""Reports: markdown and table artifacts with stable keys, published also when a flow fails.

Rendering is plain functions (tested without Prefect); publishing needs a flow or task run and does
nothing outside one (a plain function called from a script has no run to attach an artifact to).
"""

from __future__ import annotations

import re
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

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
