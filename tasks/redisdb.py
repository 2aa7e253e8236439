"""Redis: server checks (PING latency, memory, eviction policy), the key census and the one
confirm-gated ``FLUSHDB`` (the runbook's Redis out-of-memory resolution).

BullMQ queue contents are in :mod:`tasks.queues`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from tasks.errors import ParameterError
from tasks.ops_task import ops_task
from tasks.runlog import run_logger
from tasks.secrets import safe_error as safe_error  # re-exported; callers pass settings.redis
from tasks.settings import OpsSettings, RedisSettings

# BullMQ loses jobs silently under any eviction policy but this one.
REQUIRED_POLICY = "noeviction"
NO_PREFIX = "(no prefix)"


def client_options(settings: RedisSettings, *, db: int | None = None) -> dict[str, Any]:
    """Connect and socket timeouts and no retries (a check must not hang), and ``db`` when given:
    the options of every Redis client, synchronous or asyncio."""
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
        "retry_on_timeout": False,
    }
    if db is not None:
        options["db"] = db
    return options


def client(settings: RedisSettings, *, db: int | None = None) -> redis.Redis:
    """A synchronous client with connect and socket timeouts and no retries (a check must not hang)."""
    return redis.Redis.from_url(settings.url.get_secret_value(), **client_options(settings, db=db))


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


# --- key census and FLUSHDB -----------------------------------------------------------------------


def key_group(key: str, depth: int) -> str:
    """The group of a key name: up to ``depth`` ``:``-separated segments, never the last (the id).

    ``bull:default:123`` -> ``bull:default:*``; ``session:abc`` -> ``session:*``; ``counter`` ->
    ``(no prefix)``.
    """
    parts = key.split(":")
    kept = parts[: min(depth, len(parts) - 1)]
    return ":".join(kept) + ":*" if kept else NO_PREFIX


@dataclass(frozen=True)
class KeyCensus:
    """What a Redis database holds, by key name prefix, and the BullMQ jobs that FLUSHDB would lose."""

    server: str
    db: int
    dbsize: int
    scanned: int
    complete: bool
    groups: tuple[tuple[str, int], ...]
    used_memory: int
    used_memory_human: str
    maxmemory: int
    maxmemory_policy: str
    queues: tuple[Any, ...] = ()
    queue_error: str | None = None
    taken_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def jobs(self) -> int:
        return sum(sum(q.counts.values()) for q in self.queues)


def db_number(conn: redis.Redis) -> int:
    """The db number a client talks to (from its URL, 0 when the URL names none)."""
    return int(conn.connection_pool.connection_kwargs.get("db", 0) or 0)


def key_census(settings: OpsSettings, *, depth: int | None = None, max_keys: int | None = None) -> KeyCensus:
    """Count the keys of the configured Redis db by prefix (SCAN with COUNT; never KEYS), plus job counts.

    Raises:
        redis.RedisError: Redis cannot be reached.
    """
    from tasks import queues

    config = settings.incidents
    depth = depth or config.key_census_depth
    limit = max_keys or config.key_census_max_keys
    conn = client(settings.redis)
    try:
        db = db_number(conn)
        dbsize = int(conn.dbsize())
        memory = conn.info("memory")
        groups: Counter[str] = Counter()
        scanned = 0
        for raw in conn.scan_iter(count=config.scan_count):
            name = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else str(raw)
            groups[key_group(name, depth)] += 1
            scanned += 1
            if scanned >= limit:
                break
    finally:
        conn.close()
    counts: list[Any] = []
    queue_error = None
    try:
        counts = queues.queue_counts(settings.redis, settings.queue)
    except Exception as exc:
        queue_error = safe_error(exc, settings.redis)
    return KeyCensus(
        server=settings.redis.masked_url,
        db=db,
        dbsize=dbsize,
        scanned=scanned,
        complete=scanned < limit,
        groups=tuple(sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))),
        used_memory=int(memory.get("used_memory", 0)),
        used_memory_human=str(memory.get("used_memory_human", "")),
        maxmemory=int(memory.get("maxmemory", 0)),
        maxmemory_policy=str(memory.get("maxmemory_policy", "unknown")),
        queues=tuple(counts),
        queue_error=queue_error,
    )


@dataclass(frozen=True)
class FlushRecord:
    """The change record of a FLUSHDB (or of its dry run)."""

    dry_run: bool
    server: str
    db: int
    keys_before: int
    keys_after: int
    command: str
    duration_seconds: float

    @property
    def changed(self) -> bool:
        return not self.dry_run and self.keys_before != self.keys_after


def flush_redis_db(settings: OpsSettings, census: KeyCensus, *, confirm: bool) -> FlushRecord:
    """The one gate for ``FLUSHDB``: without ``confirm`` nothing is deleted and the census is the plan.

    Only the db the census was taken of is flushed (never ``FLUSHALL``); a settings change in between
    (another db number) refuses.

    Raises:
        ParameterError: the configured db is not the one the census (and the approval) showed.
        redis.RedisError: Redis cannot be reached or refused the command.
    """
    started = time.monotonic()
    command = f"FLUSHDB (db {census.db} on {census.server})"
    conn = client(settings.redis)
    try:
        db = db_number(conn)
        if db != census.db:
            raise ParameterError(
                f"the census was of db {census.db}, the settings now name db {db}; nothing was flushed."
                " Run again to see what the current db holds"
            )
        before = int(conn.dbsize())
        if not confirm:
            return FlushRecord(True, census.server, db, before, before, command, 0.0)
        run_logger(__name__).warning("FLUSHDB on db %s of %s: %s keys", db, census.server, before)
        conn.flushdb()
        after = int(conn.dbsize())
    finally:
        conn.close()
    return FlushRecord(False, census.server, db, before, after, command, round(time.monotonic() - started, 3))


# --- Prefect task wrappers ------------------------------------------------------------------------

key_census_task = ops_task(key_census, name="redis-key-census")
flush_redis_db_task = ops_task(flush_redis_db, name="flush-redis-db")
