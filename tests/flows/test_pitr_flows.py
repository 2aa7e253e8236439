"""The point-in-time recovery flows under the Prefect harness against a private PostgreSQL 15 cluster
with the archiver streaming: backup-base, check-wal-archive, restore-to-point (dry run, then real)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flows.pitr import backup_base, check_wal_archive, restore_to_point
from tasks.storage import open_storage
from tests.fixtures.pitr import PG_BIN, WalCluster, Writer, pitr_settings, running_archiver
from tests.integration.test_pitr_restore import _archived_up_to_now

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def pitr_env(monkeypatch: pytest.MonkeyPatch, wal_cluster: WalCluster, shared_dir: Path) -> dict[str, Any]:
    values = {
        "OPS_STACK": "teststack",
        "OPS_POSTGRES__DSN": wal_cluster.dsn("app"),
        "OPS_STORAGE__URL": f"file://{shared_dir / 'store'}",
        "OPS_WAL__SPOOL_DIR": str(shared_dir / "spool"),
        "OPS_WAL__SERVER_BIN_DIR": str(PG_BIN),
        "OPS_RUNTIME__KIND": "none",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def test_base_backup_then_restore_to_a_point(
    pitr_env: dict[str, Any], wal_cluster: WalCluster, shared_dir: Path
) -> None:
    settings = pitr_settings(wal_cluster, pitr_env["OPS_STORAGE__URL"], shared_dir / "spool")
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    writer = Writer(wal_cluster.dsn("app"))
    writer.setup()
    with running_archiver(settings):
        writer.write(20)
        state = backup_base(wait_for_wal_seconds=30, return_state=True)
        assert state.is_completed(), state.message
        assert state.result()["wal_ready"] is True
        writer.write(20, pause=0.02)
        time.sleep(1.1)
        target = datetime.now(UTC)
        time.sleep(0.2)
        wal_cluster.execute("TRUNCATE events")
        _archived_up_to_now(wal_cluster, storage)
        status = check_wal_archive(return_state=True)
        assert status.is_completed(), status.message
        assert status.result()["base_backups"] == 1
        assert status.result()["gaps"] == []

    plan = restore_to_point(target_time=target, return_state=True)
    assert plan.is_completed(), plan.message
    assert plan.result()["dry_run"] is True
    assert wal_cluster.execute("SELECT count(*) FROM events") == [(0,)]  # nothing touched

    done = restore_to_point(target_time=target, dry_run=False, approved=True, return_state=True)
    assert done.is_completed(), done.message
    assert done.result()["matches"] is True
    assert [r[0] for r in wal_cluster.execute("SELECT id FROM events ORDER BY id")] == writer.ids_until(
        target
    )
    assert len(writer.ids_until(target)) == 40


def test_restore_to_point_refuses_two_targets(pitr_env: dict[str, Any]) -> None:
    state = restore_to_point(
        target_time=datetime.now(UTC) - timedelta(minutes=1), target_lsn="0/1000000", return_state=True
    )
    assert state.is_failed()
    assert "exactly one" in str(state.message) or "exactly one" in repr(state.result(raise_on_failure=False))
