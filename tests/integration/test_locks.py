"""tasks/locks.py on the real PostgreSQL: one holder per name, the holder named in full (flow run name
and id) although application_name is cut at 63 bytes, a wait that ends when the holder lets go, and
the migration lock naming its flow run the same way."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from prefect import flow

from tasks import backup, locks, migrate
from tasks.errors import LockBusy
from tasks.settings import load_settings

pytestmark = pytest.mark.integration

LONG_NAME = "a-flow-run-name-much-longer-than-what-application-name-can-hold-" + "x" * 20


def _refusal(name: str, timeout: float = 0) -> str:
    """Ask for ``name`` from this thread (own session); return the LockBusy message."""
    with (
        pytest.raises(LockBusy) as error,
        locks.exclusive(load_settings(), name, operation="second", what="the second run", timeout=timeout),
    ):
        pass
    return str(error.value)


def test_the_holder_is_named_in_full_and_another_name_is_free(prefect_harness, ops_env):
    name = f"swagger2mcp-ops:test:{uuid.uuid4().hex}"
    seen: dict[str, Any] = {}

    @flow(flow_run_name=LONG_NAME)
    def holding() -> None:
        with locks.exclusive(load_settings(), name, operation="holding", what="the test") as holder:
            seen["holder"] = holder
            seen["refusal"] = _refusal(name)
            # Another target is another lock.
            with locks.exclusive(load_settings(), name + ":other", operation="x", what="other", timeout=0):
                pass
            with psycopg.connect(ops_env["dsn"]) as conn:
                seen["application_names"] = [
                    r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity").fetchall()
                ]

    holding()
    holder: locks.Holder = seen["holder"]
    assert holder.flow_run_name == LONG_NAME
    assert holder.flow_run_id is not None
    assert (
        f"the second run is already running: lock {name} is held by flow run {LONG_NAME!r}" in seen["refusal"]
    )
    assert holder.flow_run_id in seen["refusal"]
    assert "pg_terminate_backend" in seen["refusal"]
    cut = holder.application_name()
    assert len(cut.encode()) <= 63
    assert holder.flow_run_id in cut
    assert cut in seen["application_names"]
    # Released with the block.
    with locks.exclusive(load_settings(), name, operation="after", what="after", timeout=0):
        pass


def test_a_waiting_run_gets_the_lock_when_the_holder_lets_go(ops_env):
    name = f"swagger2mcp-ops:test:{uuid.uuid4().hex}"
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locks.exclusive(load_settings(), name, operation="first", what="first", timeout=0):
            taken.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(30)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    with locks.exclusive(load_settings(), name, operation="second", what="second", timeout=20):
        waited = time.monotonic() - started
    thread.join(10)
    assert 0.5 < waited < 15


def test_a_run_that_waits_out_its_timeout_names_the_holder(ops_env):
    name = f"swagger2mcp-ops:test:{uuid.uuid4().hex}"
    with locks.exclusive(load_settings(), name, operation="first", what="first", timeout=0):
        message = _refusal(name, timeout=0.5)
    assert "the second run is still running after 0.5 s" in message
    assert "first outside a flow run on host" in message


def test_the_migration_lock_names_its_flow_run(prefect_harness, ops_env):
    seen: dict[str, Any] = {}

    @flow(flow_run_name=LONG_NAME)
    def migrating() -> None:
        settings = load_settings()
        with migrate.migration_lock(settings, owner="migrate-database"):
            seen["holder"] = locks.Holder.current("migrate-database")
            seen["refusal"] = _refusal(backup.database_lock_name(ops_env["database"]))

    migrating()
    assert LONG_NAME in seen["refusal"]
    assert str(seen["holder"].flow_run_id) in seen["refusal"]
