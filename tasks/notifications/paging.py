"""Health paging: on-call is paged only after N consecutive unhealthy checks, once per failing check
(a dedup key per stack and check), never again while that page is open, and the page is resolved by
the first check that is not unhealthy. Degraded is a chat message, once per change into it.

The state (consecutive count, open page, last status per check) lives in the storage backend, so
every worker sees the same; the notify-event deployment runs one at a time, so updates do not race.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, open_storage

UNHEALTHY = "unhealthy"
DEGRADED = "degraded"


class CheckState(BaseModel):
    """What the paging remembers of one check."""

    consecutive_unhealthy: int = 0
    status: str = "healthy"
    open_dedup_key: str | None = None
    opened_at: datetime | None = None


class PagingState(BaseModel):
    """Every check of one stack."""

    stack: str
    checks: dict[str, CheckState] = Field(default_factory=dict)


@dataclass(frozen=True)
class PagingDecision:
    """One thing to send: open a page, resolve it, or tell the chat that a check is degraded."""

    kind: Literal["trigger", "resolve", "degraded"]
    check: str
    dedup_key: str | None
    consecutive: int
    detail: str = ""


def dedup_key(stack: str, check: str) -> str:
    """The page's identity: one incident per stack and failing check."""
    return f"swagger2mcp-ops-{stack}-health-{check}"


def decide(
    state: PagingState,
    statuses: Mapping[str, str],
    *,
    threshold: int,
    details: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> tuple[PagingState, list[PagingDecision]]:
    """The next state and what to send, from one health report's status per check.

    A check missing from the report counts as healthy (it was removed from the configuration, so an
    open page for it must not stay open forever).
    """
    now = now or datetime.now(UTC)
    details = details or {}
    checks: dict[str, CheckState] = {}
    decisions: list[PagingDecision] = []
    for name in sorted(set(state.checks) | set(statuses)):
        before = state.checks.get(name, CheckState())
        status = statuses.get(name, "healthy")
        detail = details.get(name, "")
        if status == UNHEALTHY:
            count = before.consecutive_unhealthy + 1
            key = before.open_dedup_key
            opened = before.opened_at
            if key is None and count >= threshold:
                key, opened = dedup_key(state.stack, name), now
                decisions.append(PagingDecision("trigger", name, key, count, detail))
            checks[name] = CheckState(
                consecutive_unhealthy=count, status=status, open_dedup_key=key, opened_at=opened
            )
            continue
        if before.open_dedup_key is not None:
            decisions.append(
                PagingDecision("resolve", name, before.open_dedup_key, before.consecutive_unhealthy, status)
            )
        if status == DEGRADED and before.status != DEGRADED:
            decisions.append(PagingDecision("degraded", name, None, 0, detail))
        if name in statuses:
            checks[name] = CheckState(status=status)
    return PagingState(stack=state.stack, checks=checks), decisions


def state_key(settings: OpsSettings) -> str:
    return f"{settings.notifications.state_prefix}/health-{settings.stack}.json"


def load_state(settings: OpsSettings) -> PagingState:
    """The stack's paging state from storage (empty before the first report)."""
    try:
        raw = open_storage(settings.storage).get_bytes(state_key(settings))
    except ObjectNotFound:
        return PagingState(stack=settings.stack)
    return PagingState.model_validate_json(raw)


def save_state(settings: OpsSettings, state: PagingState) -> None:
    """Write the state back (one object, replaced whole)."""
    open_storage(settings.storage).put_bytes(state_key(settings), state.model_dump_json(indent=2).encode())
