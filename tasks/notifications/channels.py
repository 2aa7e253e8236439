"""Sending one rendered message over one channel: HTTP for Slack, PagerDuty and webhooks, SMTP with
STARTTLS and auth for e-mail. Each call is one attempt; retries live in :mod:`delivery`."""

from __future__ import annotations

import smtplib
import ssl

import httpx

from tasks.errors import OpsError
from tasks.notifications import render
from tasks.notifications.model import Message
from tasks.secrets import mask_text
from tasks.settings import ChannelSettings, NotificationsSettings


class DeliveryError(OpsError):
    """One attempt to deliver a message failed; the text is masked and says what the channel did."""


def channel_secrets(channel: ChannelSettings, settings: NotificationsSettings) -> list[str]:
    """Every secret a channel uses (masked out of errors, logs and events)."""
    values = [channel.url, channel.routing_key, channel.authorization]
    if channel.kind == "email":
        values.append(settings.smtp.password)
    return [v.get_secret_value() for v in values if v is not None]


def _post(url: str, body: object, *, timeout: float, headers: dict[str, str] | None = None) -> str:
    with httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False) as http:
        response = http.post(url, json=body, headers={"User-Agent": "swagger2mcp-ops", **(headers or {})})
    if response.status_code >= 300:
        raise DeliveryError(f"HTTP {response.status_code}: {response.text[:200]}")
    return f"HTTP {response.status_code}"


def send_slack(channel: ChannelSettings, message: Message, settings: NotificationsSettings) -> str:
    """POST the Slack-format body to the channel's incoming webhook."""
    assert channel.url is not None  # the settings model requires it for this kind
    return _post(
        channel.url.get_secret_value(), render.slack_payload(message), timeout=settings.timeout_seconds
    )


def send_webhook(channel: ChannelSettings, message: Message, settings: NotificationsSettings) -> str:
    """POST the generic JSON document, with the channel's Authorization header when it has one."""
    assert channel.url is not None
    headers = {"Authorization": channel.authorization.get_secret_value()} if channel.authorization else None
    return _post(
        channel.url.get_secret_value(),
        render.webhook_payload(message),
        timeout=settings.timeout_seconds,
        headers=headers,
    )


def send_pagerduty(channel: ChannelSettings, message: Message, settings: NotificationsSettings) -> str:
    """Send a PagerDuty Events API v2 trigger or resolve (202 Accepted is success)."""
    assert channel.routing_key is not None
    url = channel.url.get_secret_value() if channel.url else settings.pagerduty_url
    body = render.pagerduty_payload(message, channel.routing_key.get_secret_value())
    status = _post(url, body, timeout=settings.timeout_seconds)
    return f"{status} {body['event_action']} {body['dedup_key']}"


def send_email(channel: ChannelSettings, message: Message, settings: NotificationsSettings) -> str:
    """Send the e-mail over SMTP: STARTTLS when configured (refused if the server does not offer it),
    then login when a user is configured."""
    smtp = settings.smtp
    if smtp.host is None:
        raise DeliveryError("no SMTP server: set OPS_NOTIFICATIONS__SMTP__HOST (and __PORT, __USERNAME)")
    mail = render.email_message(message, sender=smtp.sender, to=channel.to)
    with smtplib.SMTP(smtp.host, smtp.port, timeout=settings.timeout_seconds) as client:
        client.ehlo()
        if smtp.starttls:
            if not client.has_extn("starttls"):
                raise DeliveryError(f"{smtp.host}:{smtp.port} does not offer STARTTLS; nothing was sent")
            context = ssl.create_default_context()
            if not smtp.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo()
        if smtp.username is not None:
            password = smtp.password.get_secret_value() if smtp.password else ""
            client.login(smtp.username, password)
        refused = client.send_message(mail)
    if refused:
        raise DeliveryError(f"the server refused recipients: {', '.join(sorted(refused))}")
    return f"sent to {len(channel.to)} recipient(s)"


SENDERS = {"slack": send_slack, "webhook": send_webhook, "pagerduty": send_pagerduty, "email": send_email}


def send(channel: ChannelSettings, message: Message, settings: NotificationsSettings) -> str:
    """One attempt over ``channel``; returns what the receiver answered.

    Raises:
        DeliveryError: the receiver refused, errored or could not be reached (the text masked).
    """
    try:
        return SENDERS[channel.kind](channel, message, settings)
    except DeliveryError as exc:
        raise DeliveryError(mask_text(str(exc), channel_secrets(channel, settings))) from None
    except (httpx.HTTPError, OSError, smtplib.SMTPException) as exc:
        text = mask_text(f"{type(exc).__name__}: {exc}", channel_secrets(channel, settings))
        raise DeliveryError(" ".join(text.split())) from None
