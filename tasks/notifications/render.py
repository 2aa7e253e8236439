"""A message as each channel wants it: Slack's ``text``, an e-mail, a PagerDuty Events v2 event, and
a generic JSON document for anything else (Opsgenie, Teams, a ticket system, a status page)."""

from __future__ import annotations

import hashlib
from email.message import EmailMessage
from typing import Any

from tasks.notifications.model import Message

_ICONS = {
    "critical": ":rotating_light:",
    "error": ":red_circle:",
    "warning": ":warning:",
    "info": ":information_source:",
}


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn treats these three as control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(message: Message) -> dict[str, Any]:
    """A Slack incoming-webhook body: ``text`` with mrkdwn, links as ``<url|name>``."""
    icon = ":white_check_mark:" if message.action == "resolve" else _ICONS[message.severity]
    lines = [f"{icon} *{_slack_escape(message.title)}*"]
    lines += [f"*{_slack_escape(name)}:* {_slack_escape(value)}" for name, value in message.fields]
    if message.links:
        lines.append(" | ".join(f"<{url}|{_slack_escape(name)}>" for name, url in message.links))
    return {"text": "\n".join(lines), "mrkdwn": True}


def email_message(message: Message, *, sender: str, to: list[str]) -> EmailMessage:
    """A plain-text e-mail: the title as subject, fields and links in the body."""
    mail = EmailMessage()
    prefix = "[resolved] " if message.action == "resolve" else f"[{message.severity}] "
    mail["Subject"] = prefix + message.title
    mail["From"] = sender
    mail["To"] = ", ".join(to)
    mail.set_content(f"{message.title}\n\n{message.text()}\n")
    return mail


def pagerduty_dedup_key(message: Message) -> str:
    """The message's dedup key, or one derived from its title (the same title: the same incident)."""
    if message.dedup_key:
        return message.dedup_key
    return "swagger2mcp-ops-" + hashlib.sha256(message.title.encode()).hexdigest()[:16]


def pagerduty_payload(message: Message, routing_key: str) -> dict[str, Any]:
    """A PagerDuty Events API v2 event: ``trigger`` with summary and details, or ``resolve``."""
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "resolve" if message.action == "resolve" else "trigger",
        "dedup_key": pagerduty_dedup_key(message),
    }
    if message.action == "resolve":
        return body
    body["payload"] = {
        # PagerDuty truncates summaries at 1024 characters.
        "summary": message.title[:1024],
        "source": message.source,
        "severity": message.severity,
        "component": "swagger2mcp-ops",
        "custom_details": dict(message.fields),
    }
    body["links"] = [{"href": url, "text": name} for name, url in message.links]
    return body


def webhook_payload(message: Message) -> dict[str, Any]:
    """The generic JSON document: every part of the message by name."""
    return {
        "title": message.title,
        "text": message.text(),
        "severity": message.severity,
        "action": message.action,
        "dedup_key": message.dedup_key,
        "source": message.source,
        "event": message.event,
        "fields": dict(message.fields),
        "links": dict(message.links),
    }
