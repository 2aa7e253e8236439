"""BullMQ queues, read and operated on through the official ``bullmq`` package, so the Lua scripts are
the same ones the Node worker runs.

Note: in BullMQ ``failed``, ``completed``, ``delayed`` and ``prioritized`` are sorted sets, not lists:
``LLEN bull:default:failed`` (as some runbooks suggest) answers with an error, not a count.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from bullmq import Queue

from tasks.settings import QueueSettings, RedisSettings

T = TypeVar("T")

# The states BullMQ keeps jobs in, in the order reports show them.
JOB_STATES: tuple[str, ...] = (
    "waiting",
    "active",
    "delayed",
    "prioritized",
    "waiting-children",
    "paused",
    "failed",
    "completed",
)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, also when this thread already has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def async_client(settings: RedisSettings, *, db: int | None = None) -> aioredis.Redis:
    """An asyncio client with timeouts and no retries, for ``bullmq.Queue(connection=...)``.

    bullmq's own default connection retries for minutes when Redis is down; a check must not.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
        "retry_on_timeout": False,
        "decode_responses": True,
    }
    if db is not None:
        kwargs["db"] = db
    return aioredis.Redis.from_url(settings.url.get_secret_value(), **kwargs)


@dataclass(frozen=True)
class QueueCounts:
    """Exact job counts of one BullMQ queue, by state."""

    name: str
    counts: dict[str, int]
    is_paused: bool

    def __getitem__(self, state: str) -> int:
        return self.counts.get(state, 0)


async def _queue_counts(redis_settings: RedisSettings, queue_settings: QueueSettings) -> list[QueueCounts]:
    conn = async_client(redis_settings)
    try:
        results = []
        for name in queue_settings.names:
            queue = Queue(name, {"connection": conn, "prefix": queue_settings.prefix})
            counts = await queue.getJobCounts(*JOB_STATES)
            paused = bool(await queue.isPaused())
            results.append(
                QueueCounts(
                    name=name, counts={s: int(counts.get(s, 0)) for s in JOB_STATES}, is_paused=paused
                )
            )
        return results
    finally:
        await conn.aclose()


def queue_counts(redis_settings: RedisSettings, queue_settings: QueueSettings) -> list[QueueCounts]:
    """Job counts by state for every configured queue, read with BullMQ's own ``getCounts`` script.

    Raises:
        redis.RedisError: Redis cannot be reached or refused the script.
    """
    return run_async(_queue_counts(redis_settings, queue_settings))
