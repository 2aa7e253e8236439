"""Health and the WAL archive, under the Prefect harness against a private PostgreSQL 15 cluster
(wal_level replica) with the real archiver: without an archive the report is as before; with the
archiver streaming, a ``wal-archive`` check reports the newest WAL, its age (RPO), the slot and the
restorable window; with the archiver stopped past a small threshold it is degraded,
``swagger2mcp-ops.wal.rpo-exceeded`` is emitted, once per episode, and diagnose shows the same."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client

from flows.health import health_check
from tasks.diagnose import Severity, wal_archive
from tasks.settings import load_settings
from tasks.storage import open_storage
from tasks.wal import base
from tasks.wal.status import rpo_alert_due
from tests.fixtures.pitr import PG_BIN, WalCluster, pitr_settings, running_archiver
from tests.integration.test_wal_archiver import wait_for

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _rpo_events(resource_id: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        async with get_client() as client:
            response = await client._client.post(
                "/events/filter",
                json={
                    "filter": {
                        "event": {"name": ["swagger2mcp-ops.wal.rpo-exceeded"]},
                        "resource": {"id": [resource_id]},
                    },
                    "limit": 10,
                },
            )
            response.raise_for_status()
            return list(response.json()["events"])

    return list(wait_for(lambda: asyncio.run(read()), what=f"rpo-exceeded event of {resource_id}"))


def test_health_reports_the_archive_and_emits_rpo_exceeded_once_the_archiver_stops(
    monkeypatch: pytest.MonkeyPatch, wal_cluster: WalCluster, shared_dir: Path, redis_db: str
) -> None:
    stack = f"rpo{secrets.token_hex(3)}"
    env = {
        "OPS_STACK": stack,
        "OPS_POSTGRES__DSN": wal_cluster.dsn("app"),
        "OPS_REDIS__URL": redis_db,
        "OPS_STORAGE__URL": f"file://{shared_dir / 'store'}",
        "OPS_WAL__SPOOL_DIR": str(shared_dir / "spool"),
        "OPS_WAL__SERVER_BIN_DIR": str(PG_BIN),
        "OPS_WAL__RPO_WARN_SECONDS": "60",
        "OPS_RUNTIME__KIND": "none",
        "OPS_HEALTH__TIMEOUT_SECONDS": "3",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = health_check(return_state=True)
    assert before.is_completed(), before.message
    assert set(before.result()["checks"]) == {"postgres", "redis", "queue"}  # no archive: as before
    assert wal_archive(load_settings()) is None  # and diagnose has no such section

    settings = pitr_settings(wal_cluster, env["OPS_STORAGE__URL"], shared_dir / "spool")
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    with running_archiver(settings):
        backed = base.create_base_backup(settings, storage=storage)  # type: ignore[arg-type]
        wait_for(lambda: base.wal_ready(storage, backed), what="the base backup's WAL archived")
        live = health_check(return_state=True)
        assert live.is_completed(), live.message
        check = live.result()["checks"]["wal-archive"]
        assert check["status"] == "healthy", check
        assert check["slot_active"] is True
        assert check["rpo_seconds"] < 60
        assert check["last_wal"] >= backed.stop_wal
        assert check["window_start_backup"] == backed.id
        assert check["timelines"] == [1]

    # The archiver is down: past a 2 s threshold the RPO is exceeded.
    monkeypatch.setenv("OPS_WAL__RPO_WARN_SECONDS", "2")
    wal_cluster.execute("CREATE TABLE written_while_down AS SELECT 1 AS x")
    time.sleep(2.5)
    down = health_check(return_state=True)
    assert down.is_completed(), down.message  # degraded does not fail the run
    report = down.result()
    assert report["status"] == "degraded"
    check = report["checks"]["wal-archive"]
    assert check["status"] == "degraded"
    assert check["rpo_seconds"] > 2
    assert any("is the archiver running?" in w for w in check["warnings"])
    events = _rpo_events(f"swagger2mcp-ops.stack.{stack}.wal-archive")
    assert len(events) == 1
    assert events[0]["payload"]["last_wal"] == check["last_wal"]

    diagnosis = wal_archive(load_settings())
    assert diagnosis is not None
    assert diagnosis.severity is Severity.WARNING
    assert {f.flow for f in diagnosis.findings} == {"check-wal-archive"}
    assert any(row["item"] == "restorable window" and backed.id in row["value"] for row in diagnosis.rows())

    # Once per episode: not again while it lasts, again after it came back under.
    current = load_settings()
    assert rpo_alert_due(current, 30.0) is False
    assert rpo_alert_due(current, 30.0, caught_up=True) is False  # an idle, caught-up archive: over
    assert rpo_alert_due(current, 30.0) is True
