"""Queue counts: real BullMQ jobs in every state (a real worker completes, fails and holds jobs), and
the health report's counts equal BullMQ's own."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from bullmq import FlowProducer, Queue, Worker

from tasks.health import check_queues
from tasks.queues import JOB_STATES, queue_counts
from tasks.settings import load_settings

EXPECTED = {
    "main": {
        "waiting": 3,  # 2 plain + the child of the flow
        "active": 1,
        "delayed": 2,
        "prioritized": 3,
        "waiting-children": 1,
        "paused": 0,
        "failed": 3,
        "completed": 4,
    },
    # BullMQ 5+ keeps a paused queue's jobs in its wait list and marks the queue paused; the legacy
    # "paused" list stays empty. The report follows BullMQ's own counts and flags the queue.
    "stopped": {
        "waiting": 2,
        "active": 0,
        "delayed": 0,
        "prioritized": 0,
        "waiting-children": 0,
        "paused": 0,
        "failed": 0,
        "completed": 0,
    },
}


async def _wait_for(queue: Queue, state: str, count: int, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if (await queue.getJobCounts(state))[state] >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{queue.name}: {state} did not reach {count}: {await queue.getJobCounts()}")


async def _populate(url: str) -> tuple[dict[str, dict[str, int]], Any]:
    opts = {"connection": url, "prefix": "bull"}
    main = Queue("main", opts)
    stopped = Queue("stopped", opts)

    async def work(job: Any, token: str) -> str:
        if job.name == "fail":
            raise ValueError("template not found")
        return "done"

    # A real worker completes 4 jobs and fails 3.
    for i in range(4):
        await main.add("ok", {"i": i})
    for i in range(3):
        await main.add("fail", {"i": i}, {"attempts": 1})
    worker = Worker("main", work, opts)
    await _wait_for(main, "completed", 4)
    await _wait_for(main, "failed", 3)
    await worker.close()

    # A second worker takes one job and holds it: active.
    release = asyncio.Event()

    async def hold(job: Any, token: str) -> str:
        await release.wait()
        return "held"

    await main.add("hold", {})
    holder = Worker("main", hold, {**opts, "concurrency": 1})
    await _wait_for(main, "active", 1)
    # The holder is busy (concurrency 1): everything added now stays where it lands.
    for i in range(2):
        await main.add("later", {"i": i})
        await main.add("delayed", {"i": i}, {"delay": 600_000})
    for i in range(3):
        await main.add("urgent", {"i": i}, {"priority": 5})
    flows = FlowProducer(opts)
    await flows.add(
        {
            "name": "parent",
            "queueName": "main",
            "data": {},
            "children": [
                {"name": "child", "queueName": "main", "data": {}},
            ],
        }
    )
    await flows.close()

    for i in range(2):
        await stopped.add("job", {"i": i})
    await stopped.pause()

    own_counts = {
        "main": await main.getJobCounts(*JOB_STATES),
        "stopped": await stopped.getJobCounts(*JOB_STATES),
    }
    await main.close()
    await stopped.close()
    return own_counts, (holder, release)


def test_counts_match_bullmq_for_every_state(redis_db: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        own_counts, (holder, release) = loop.run_until_complete(_populate(redis_db))
        settings = load_settings(redis={"url": redis_db}, queue={"names": ["main", "stopped"]})
        counts = {q.name: q for q in queue_counts(settings.redis, settings.queue)}
        assert {name: q.counts for name, q in counts.items()} == EXPECTED
        assert {name: dict(q.counts) for name, q in counts.items()} == {
            name: {s: own_counts[name][s] for s in JOB_STATES} for name in own_counts
        }
        assert counts["stopped"].is_paused
        assert not counts["main"].is_paused

        # failed/completed/delayed are sorted sets: the runbook's LLEN would be wrong for them.
        raw = redis.Redis.from_url(redis_db)
        assert raw.type("bull:main:failed") == b"zset"
        assert raw.zcard("bull:main:failed") == 3
        raw.close()

        check = check_queues(settings)
        runbook = check.as_runbook()
        assert runbook["status"] == "degraded"  # a paused queue is worth a warning
        assert runbook["active"] == 1
        assert runbook["waiting"] == 5
        assert runbook["failed"] == 3
        assert runbook["paused"] == 0
        assert any("paused queues: stopped" in w for w in runbook["warnings"])
        assert runbook["queues"]["stopped"]["is_paused"] is True
    finally:
        release.set()
        loop.run_until_complete(holder.close())
        loop.close()
