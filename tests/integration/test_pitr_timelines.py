"""A promotion in the middle of the archive, against private PostgreSQL clusters (1 MB segments): the
archiver streams the primary, a base backup and rows go in, a standby (``pg_basebackup -R``) takes
over on timeline 2 and the archiver is pointed at it (its slot created there), more rows go in and
then a damaging DELETE. The archive holds ``00000002.history``, the status shows both timelines and
no gap, a transaction of timeline 2 is found for a target, and a restore to a time after the
promotion brings back the rows of both timelines."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.storage import open_storage
from tasks.wal import archive, base, recover, status
from tests.fixtures.pg_cluster import PG_BIN, PrivateCluster
from tests.fixtures.pitr import WalCluster, Writer, pitr_settings, running_archiver
from tests.integration.test_wal_archiver import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def standby_of(wal_cluster: WalCluster) -> Iterator[WalCluster]:
    """A streaming standby of ``wal_cluster`` (``pg_basebackup -R``), started; removed afterwards."""
    cluster = PrivateCluster(
        "ops-pitr-standby-", "--wal-segsize=1", settings=dict(wal_cluster.cluster.settings)
    )
    try:
        shutil.rmtree(cluster.data)
        subprocess.run(
            [
                str(PG_BIN / "pg_basebackup"),
                "-D",
                str(cluster.data),
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",  # a spread checkpoint would hold the test up for a minute
                "-d",
                wal_cluster.dsn(),
            ],
            user="postgres",
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster.start()
        yield WalCluster(cluster)
    finally:
        cluster.close()


def _replayed(standby: WalCluster, lsn: str) -> bool:
    row = standby.execute(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn", "postgres")
    return bool(row[0][0])


def test_restore_after_a_promotion_brings_back_both_timelines(
    wal_cluster: WalCluster, standby_of: WalCluster, shared_dir: Path
) -> None:
    store, spool = f"file://{shared_dir / 'store'}", shared_dir / "spool"
    on_primary = pitr_settings(wal_cluster, store, spool)
    on_standby = pitr_settings(standby_of, store, spool)
    storage = open_storage(on_primary.storage)  # type: ignore[attr-defined]
    writer = Writer(wal_cluster.dsn("app"))
    with running_archiver(on_primary):
        writer.setup()
        writer.write(20)
        manifest = base.create_base_backup(on_primary, storage=storage)  # type: ignore[arg-type]
        writer.write(20)
        wal_cluster.switch_wal()
        writer.write(10)
        lsn = str(wal_cluster.execute("SELECT pg_current_wal_lsn()", "postgres")[0][0])
        wait_for(lambda: _replayed(standby_of, lsn), what="standby caught up")
        # The old primary goes away (its walsenders hand out all of its WAL first), the standby takes over.
        wal_cluster.cluster.stop()
    assert standby_of.execute("SELECT pg_promote(true, 60)", "postgres") == [(True,)]
    current_wal = "SELECT pg_walfile_name(pg_current_wal_lsn())"
    assert str(standby_of.execute(current_wal, "postgres")[0][0]).startswith("00000002")
    with running_archiver(on_standby):
        writer.dsn = standby_of.dsn("app")
        writer.write(30)
        standby_of.switch_wal()
        writer.write(10)
        standby_of.execute("CREATE TABLE marks (v int)")
        xid = standby_of.execute(
            "WITH m AS (INSERT INTO marks VALUES (1) RETURNING v) SELECT pg_current_xact_id()::text FROM m"
        )[0][0]
        time.sleep(0.3)
        target = datetime.now(UTC)
        time.sleep(0.3)
        standby_of.execute("DELETE FROM events WHERE id % 2 = 0")
        current = str(standby_of.execute(current_wal, "postgres")[0][0])
        standby_of.switch_wal()
        wait_for(lambda: current in archive.list_archive(storage).segments, what=f"{current} archived")

        listing = archive.list_archive(storage)
        assert "00000002.history" in listing.histories
        # The old timeline's last (never finished) segment does not stay in the spool.
        wait_for(
            lambda: not list(spool.glob("00000001*.partial")),
            timeout=10,
            what="old timeline's partial retired",
        )
        state = status.archive_status(on_standby, storage=storage)  # type: ignore[arg-type]
        assert state.timelines == [1, 2]
        assert state.gaps == []
        assert state.timeline_path is not None
        assert state.timeline_path.startswith("timeline 1 until ")
        assert state.timeline_path.endswith(", then timeline 2")
        assert not [p for p in state.problems if "missing" in p or "history" in p], state.problems

        plan = recover.plan_point_restore(on_standby, target_time=target)  # type: ignore[arg-type]
        assert plan.base.id == manifest.id
        assert plan.segments[0].startswith("00000001")
        assert plan.segments[-1].startswith("00000002")
        # A transaction of timeline 2 is found in its WAL (pg_waldump reads one timeline per run).
        by_xid = recover.plan_point_restore(on_standby, target_xid=str(xid))  # type: ignore[arg-type]
        assert f"just before transaction {xid}" in by_xid.target
        assert by_xid.segments[0].startswith("00000001")
        assert by_xid.segments[-1].startswith("00000002")
        result = recover.restore_to_point(on_standby, plan=plan)  # type: ignore[arg-type]

    assert result.comparison.matches, result.comparison.summary()
    assert "recovery stopping before commit" in result.reached
    rows = [r[0] for r in standby_of.execute("SELECT id FROM events ORDER BY id")]
    assert rows == list(range(1, 91))
    assert rows == writer.ids_until(target)
