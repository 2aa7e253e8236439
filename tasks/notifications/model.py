"""What a notification is: one message, rendered per channel, and the record of each delivery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["critical", "error", "warning", "info"]
Action = Literal["trigger", "resolve", "notify"]


@dataclass(frozen=True)
class Message:
    """One thing to tell people, independent of the channel that carries it.

    Attributes:
        title: one line (the chat line's start, the e-mail subject, the page summary).
        severity: PagerDuty's scale; chat and e-mail show it.
        source: what it is about (a stack, a flow run), PagerDuty's ``source``.
        fields: named facts, in order (flow, deployment, parameters, failing step, error...).
        links: named URLs (the run in the UI, the incident bundle).
        action: ``trigger`` opens a page, ``resolve`` closes the page with ``dedup_key``, ``notify`` is
            information (PagerDuty channels receive it as a trigger all the same).
        dedup_key: the page's identity: a trigger and its resolve carry the same key.
        event: the Prefect event that caused it, for webhook receivers that route on it.
    """

    title: str
    severity: Severity = "info"
    source: str = "swagger2mcp-ops"
    fields: tuple[tuple[str, str], ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    action: Action = "notify"
    dedup_key: str | None = None
    event: str | None = None

    def text(self) -> str:
        """The plain-text body: fields, then links, one per line."""
        lines = [f"{name}: {value}" for name, value in self.fields]
        lines += [f"{name}: {url}" for name, url in self.links]
        return "\n".join(lines)


@dataclass(frozen=True)
class Delivery:
    """What became of one message on one channel."""

    channel: str
    kind: str
    delivered: bool
    attempts: int
    detail: str = ""
    errors: tuple[str, ...] = field(default=())

    def as_row(self) -> dict[str, object]:
        return {
            "channel": self.channel,
            "kind": self.kind,
            "delivered": self.delivered,
            "attempts": self.attempts,
            "detail": self.detail,
        }
