"""Delivering a message to every channel of its audiences: each channel on its own, each attempt
after a doubling wait, and a channel that stays down reported (log and event), never raised: a page
that cannot reach Slack must still reach PagerDuty, and the run that caused it is not failed by it."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from prefect.events import emit_event

from tasks.notifications import channels as channel_senders
from tasks.notifications.model import Delivery, Message
from tasks.runlog import run_logger
from tasks.settings import ChannelSettings, NotificationsSettings

FAILED_EVENT = "swagger2mcp-ops.notification.failed"


def channels_for(
    settings: NotificationsSettings, audiences: Iterable[str], kinds: Iterable[str] | None = None
) -> dict[str, ChannelSettings]:
    """The configured channels serving any of ``audiences`` (``*``: every channel), of ``kinds`` when
    given, by name."""
    wanted = set(audiences)
    return {
        name: channel
        for name, channel in sorted(settings.channels.items())
        if ("*" in wanted or wanted & set(channel.audiences))
        and (kinds is None or channel.kind in set(kinds))
    }


def backoff_delays(attempts: int, first: float) -> list[float]:
    """The waits before attempts 2..n: ``first``, then doubling."""
    return [first * 2**i for i in range(max(attempts - 1, 0))]


def deliver_one(
    name: str,
    channel: ChannelSettings,
    message: Message,
    settings: NotificationsSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """Try one channel up to ``settings.attempts`` times with backoff; never raises."""
    logger = run_logger(__name__)
    errors: list[str] = []
    delays = backoff_delays(settings.attempts, settings.backoff_seconds)
    for attempt in range(1, settings.attempts + 1):
        try:
            detail = channel_senders.send(channel, message, settings)
        except channel_senders.DeliveryError as exc:
            errors.append(str(exc))
            logger.warning(
                "notification %r to channel %s (%s): attempt %d of %d failed: %s",
                message.title,
                name,
                channel.kind,
                attempt,
                settings.attempts,
                exc,
            )
            if attempt <= len(delays):
                sleep(delays[attempt - 1])
            continue
        logger.info(
            "notification %r delivered to channel %s (%s): %s", message.title, name, channel.kind, detail
        )
        return Delivery(name, channel.kind, True, attempt, detail, tuple(errors))
    return Delivery(name, channel.kind, False, settings.attempts, errors[-1] if errors else "", tuple(errors))


def report_failure(delivery: Delivery, message: Message, stack: str) -> None:
    """Make a failed delivery visible: an error log line and a ``swagger2mcp-ops.notification.failed``
    event (channel name and kind, attempts, the masked error; never the channel's URL or key)."""
    run_logger(__name__).error(
        "could not deliver %r to channel %s (%s) after %d attempts: %s. Check the channel with the"
        " notify-test deployment.",
        message.title,
        delivery.channel,
        delivery.kind,
        delivery.attempts,
        delivery.detail,
    )
    emit_event(
        event=FAILED_EVENT,
        resource={
            "prefect.resource.id": f"swagger2mcp-ops.stack.{stack}.notification-channel.{delivery.channel}",
            "prefect.resource.name": f"{stack} channel {delivery.channel}",
            "swagger2mcp-ops.stack": stack,
        },
        payload={
            "channel": delivery.channel,
            "kind": delivery.kind,
            "attempts": delivery.attempts,
            "error": delivery.detail,
            "title": message.title,
            "dedup_key": message.dedup_key,
        },
    )


def deliver(
    message: Message,
    audiences: Iterable[str],
    settings: NotificationsSettings,
    *,
    stack: str,
    kinds: Iterable[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Delivery]:
    """Deliver ``message`` to every channel serving ``audiences``; one result per channel.

    A resolve goes to the same audience as its trigger: chat and e-mail hear that the page closed,
    PagerDuty gets the resolve with the same dedup key.
    """
    targets = channels_for(settings, audiences, kinds)
    if not targets:
        return []
    # Channels in parallel: one that is down and backing off must not delay the page on another.
    with ThreadPoolExecutor(max_workers=min(len(targets), 8), thread_name_prefix="notify") as pool:
        # Each thread runs in a copy of this context, so its log lines reach the run in the UI.
        futures = [
            pool.submit(
                contextvars.copy_context().run, deliver_one, name, channel, message, settings, sleep=sleep
            )
            for name, channel in targets.items()
        ]
        results = [future.result() for future in futures]
    for result in results:
        if not result.delivered:
            report_failure(result, message, stack)
    return results
