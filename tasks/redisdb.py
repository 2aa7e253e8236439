"""Redis server checks (PING latency, memory, eviction policy).

BullMQ queue contents are in :mod:`tasks.queues`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from tasks.secrets import mask_text
from tasks.settings import RedisSettings

# BullMQ loses jobs silently under any eviction policy but this one.
REQUIRED_POLICY = "noeviction"


def client(settings: RedisSettings, *, db: int | None = None) -> redis.Redis:
    """A synchronous client with connect and socket timeouts and no retries (a check must not hang)."""
    kwargs: dict[str, object] = {
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
        "retry_on_timeout": False,
    }
    if db is not None:
        kwargs["db"] = db
    return redis.Redis.from_url(settings.url.get_secret_value(), **kwargs)


def safe_error(exc: BaseException, settings: RedisSettings) -> str:
    """A one-line error text for reports, the URL's password masked."""
    secret = settings.url.get_secret_value()
    text = " ".join(str(exc).split()) or type(exc).__name__
    return mask_text(text, [secret, urlsplit(secret).password or ""])


@dataclass(frozen=True)
class RedisProbe:
    """PING latency and memory figures of one Redis server."""

    latency_ms: float
    version: str
    used_memory: int
    maxmemory: int
    maxmemory_policy: str

    @property
    def memory_ratio(self) -> float | None:
        return self.used_memory / self.maxmemory if self.maxmemory else None


def probe_redis(settings: RedisSettings) -> RedisProbe:
    """PING round trip and ``INFO memory``/``INFO server`` (works where CONFIG GET is disabled).

    Raises:
        redis.RedisError: the server cannot be reached or refused the command.
    """
    conn = client(settings)
    try:
        conn.ping()  # connect outside the timed round trip
        started = time.perf_counter()
        conn.ping()
        latency_ms = (time.perf_counter() - started) * 1000
        memory = conn.info("memory")
        server = conn.info("server")
    finally:
        conn.close()
    return RedisProbe(
        latency_ms=round(latency_ms, 2),
        version=str(server.get("redis_version", "unknown")),
        used_memory=int(memory.get("used_memory", 0)),
        maxmemory=int(memory.get("maxmemory", 0)),
        maxmemory_policy=str(memory.get("maxmemory_policy", "unknown")),
    )
