"""Redis checks: memory against ``maxmemory``, the eviction policy BullMQ needs, fragmentation and
evictions (runbook Common Issues 2 and 4). Redis that cannot be reached is a critical finding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks import redisdb
from tasks.diagnose.model import FLOW_CLEAN_JOBS, FLOW_RESTART, RB_REDIS, Diagnosis, Finding, Severity
from tasks.settings import DiagnoseSettings, RedisSettings


@dataclass(frozen=True)
class RedisMemory:
    """``INFO memory`` (and evictions from ``INFO stats``)."""

    used: int
    used_human: str
    peak: int
    peak_human: str
    maxmemory: int
    fragmentation_ratio: float | None
    policy: str
    evicted_keys: int

    @property
    def ratio(self) -> float | None:
        return self.used / self.maxmemory if self.maxmemory else None

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"metric": "used_memory", "value": f"{self.used} ({self.used_human})"},
            {"metric": "used_memory_peak", "value": f"{self.peak} ({self.peak_human})"},
            {"metric": "maxmemory", "value": self.maxmemory or "0 (no limit)"},
            {"metric": "used / maxmemory", "value": "" if self.ratio is None else f"{self.ratio:.0%}"},
            {"metric": "mem_fragmentation_ratio", "value": self.fragmentation_ratio},
            {"metric": "maxmemory_policy", "value": self.policy},
            {"metric": "evicted_keys", "value": self.evicted_keys},
        ]


def read_redis_memory(settings: RedisSettings) -> RedisMemory:
    """``INFO memory`` and ``INFO stats`` of the queues' Redis.

    Raises:
        redis.RedisError: Redis cannot be reached.
    """
    conn = redisdb.client(settings)
    try:
        memory = conn.info("memory")
        stats = conn.info("stats")
    finally:
        conn.close()
    frag = memory.get("mem_fragmentation_ratio")
    return RedisMemory(
        used=int(memory.get("used_memory", 0)),
        used_human=str(memory.get("used_memory_human", "")),
        peak=int(memory.get("used_memory_peak", 0)),
        peak_human=str(memory.get("used_memory_peak_human", "")),
        maxmemory=int(memory.get("maxmemory", 0)),
        fragmentation_ratio=None if frag is None else float(frag),
        policy=str(memory.get("maxmemory_policy", "unknown")),
        evicted_keys=int(stats.get("evicted_keys", 0)),
    )


def redis_memory_findings(memory: RedisMemory, limits: DiagnoseSettings) -> list[Finding]:
    """Findings from Redis memory figures (a pure function of the evidence)."""
    check = "redis-memory"
    findings: list[Finding] = []
    ratio = memory.ratio
    oom_resolution = (
        "Redis out of memory: clean old completed/failed jobs first (clean-jobs); the runbook's FLUSHDB"
        " (then restart worker) loses every job and is offered only behind an approval (flush-redis)"
    )
    if ratio is not None and ratio >= limits.redis_memory_critical_ratio:
        findings.append(
            Finding(
                check,
                Severity.CRITICAL,
                f"used memory {memory.used_human} is {ratio:.0%} of maxmemory ({memory.maxmemory} bytes)",
                RB_REDIS,
                oom_resolution,
                FLOW_CLEAN_JOBS,
            )
        )
    elif ratio is not None and ratio >= limits.redis_memory_warn_ratio:
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"used memory {memory.used_human} is {ratio:.0%} of maxmemory ({memory.maxmemory} bytes)",
                RB_REDIS,
                oom_resolution,
                FLOW_CLEAN_JOBS,
            )
        )
    if memory.policy != redisdb.REQUIRED_POLICY:
        evicting = memory.evicted_keys > 0
        findings.append(
            Finding(
                check,
                Severity.CRITICAL if evicting else Severity.WARNING,
                f"maxmemory-policy is {memory.policy!r}, BullMQ needs 'noeviction'"
                + (
                    f"; {memory.evicted_keys} keys were already evicted (jobs may be lost)"
                    if evicting
                    else ""
                ),
                RB_REDIS,
                "CONFIG SET maxmemory-policy noeviction, and set it in redis.conf so a restart keeps it",
                None,
            )
        )
    # Below ~10 MB used the ratio is noise (allocator overhead dominates).
    if (
        memory.fragmentation_ratio is not None
        and memory.fragmentation_ratio >= limits.redis_fragmentation_warn
        and memory.used >= 10 * 1024 * 1024
    ):
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"memory fragmentation ratio {memory.fragmentation_ratio:g}",
                RB_REDIS,
                "Restart Redis (docker compose restart redis) in a quiet moment, or enable activedefrag",
                FLOW_RESTART,
            )
        )
    if not findings:
        used = f"{memory.used_human}" + ("" if ratio is None else f" ({ratio:.0%} of maxmemory)")
        findings.append(Finding(check, Severity.OK, f"used {used}, policy {memory.policy}", RB_REDIS))
    return findings


def unreachable_redis(check: str, exc: BaseException, settings: RedisSettings) -> Finding:
    """The critical finding of a check (redis-memory, queues) that could not reach Redis."""
    return Finding(
        check,
        Severity.CRITICAL,
        f"cannot reach Redis at {settings.masked_url}: {redisdb.safe_error(exc, settings)}",
        RB_REDIS,
        "Restart Redis (docker compose restart redis); check reachability below",
        FLOW_RESTART,
    )


def redis_memory(settings: RedisSettings, limits: DiagnoseSettings) -> Diagnosis:
    """Runbook 2 "Check Redis memory": used, peak, maxmemory, fragmentation, policy, evictions."""
    check, title = "redis-memory", "Redis memory"
    try:
        memory = read_redis_memory(settings)
    except Exception as exc:
        return Diagnosis(check, title, None, (unreachable_redis(check, exc, settings),), error=str(exc))
    return Diagnosis(check, title, memory, tuple(redis_memory_findings(memory, limits)))
