"""The Redis out-of-memory offer on the real Redis (this test's own db): the census shows keys by
prefix and BullMQ jobs; the dry run deletes nothing; the confirmed FLUSHDB empties only this db."""

from __future__ import annotations

import asyncio

import pytest
import redis
from bullmq import Queue

from tasks import redisdb
from tasks.errors import ParameterError
from tasks.settings import load_settings

QUEUE = "ops-inc-jobs"


async def _add_jobs(url: str, count: int) -> None:
    queue = Queue(QUEUE, {"connection": url})
    try:
        for n in range(count):
            await queue.add("work", {"n": n})
    finally:
        await queue.close()


@pytest.fixture
def filled_db(redis_db):
    asyncio.run(_add_jobs(redis_db, 3))
    conn = redis.Redis.from_url(redis_db)
    try:
        conn.set("session:a", "1")
        conn.set("session:b", "2")
        conn.set("cache:users:1", "x")
        conn.set("counter", "7")
        yield redis_db, int(conn.dbsize())
    finally:
        conn.close()


def _settings(url: str):
    return load_settings(redis={"url": url}, queue={"names": [QUEUE]})


def test_census_groups_keys_and_counts_jobs(filled_db):
    url, size = filled_db
    census = redisdb.key_census(_settings(url))
    assert census.db == int(url.rsplit("/", 1)[1])
    assert census.db != 0
    assert census.dbsize == size
    assert census.scanned == size
    assert census.complete
    groups = dict(census.groups)
    assert groups["session:*"] == 2
    assert groups["cache:users:*"] == 1
    assert groups[redisdb.NO_PREFIX] == 1
    assert groups[f"bull:{QUEUE}:*"] == size - 4
    assert [q.name for q in census.queues] == [QUEUE]
    assert census.queues[0]["waiting"] == 3
    assert census.jobs == 3
    limited = redisdb.key_census(_settings(url), max_keys=2)
    assert not limited.complete
    assert limited.scanned == 2


def test_dry_run_deletes_nothing_and_confirm_flushes_only_this_db(filled_db):
    url, size = filled_db
    settings = _settings(url)
    census = redisdb.key_census(settings)
    dry = redisdb.flush_redis_db(settings, census, confirm=False)
    assert dry.dry_run
    assert not dry.changed
    assert dry.keys_before == size
    conn = redis.Redis.from_url(url)
    try:
        assert conn.dbsize() == size
        record = redisdb.flush_redis_db(settings, census, confirm=True)
        assert record.changed
        assert (record.keys_before, record.keys_after) == (size, 0)
        assert conn.dbsize() == 0
        assert f"db {census.db}" in record.command
    finally:
        conn.close()


def test_flush_refuses_when_the_db_changed_since_the_census(filled_db):
    url, size = filled_db
    census = redisdb.key_census(_settings(url))
    other = url.rsplit("/", 1)[0] + f"/{(census.db % 15) + 1}"
    with pytest.raises(ParameterError, match="nothing was flushed"):
        redisdb.flush_redis_db(_settings(other), census, confirm=True)
    conn = redis.Redis.from_url(url)
    try:
        assert conn.dbsize() == size
    finally:
        conn.close()
