"""The PITR drill under the Prefect harness against a private PostgreSQL 15 cluster (wal_level
replica) with the archiver streaming: backup-base, backup-database, more writes, then pitr-drill
recovers the archive to the backup's snapshot (stopping before the later writes) and matches its
manifest table by table. A newer backup taken once the archive stopped growing is drilled by
replaying to the archive's end; its manifest, with a count and a content hash altered, makes the
drill fail naming exactly those tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flows.backup import backup_database
from flows.pitr import backup_base, pitr_drill
from tasks.backup import manifest_key
from tasks.storage import open_storage
from tasks.wal import archive
from tests.fixtures.pitr import PG_BIN, WalCluster, Writer, pitr_settings, running_archiver
from tests.integration.test_pitr_restore import _archived_up_to_now
from tests.integration.test_wal_archiver import wait_for

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def drill_env(monkeypatch: pytest.MonkeyPatch, wal_cluster: WalCluster, shared_dir: Path) -> dict[str, Any]:
    values = {
        "OPS_STACK": "teststack",
        "OPS_POSTGRES__DSN": wal_cluster.dsn("app"),
        "OPS_STORAGE__URL": f"file://{shared_dir / 'store'}",
        "OPS_WAL__SPOOL_DIR": str(shared_dir / "spool"),
        "OPS_WAL__SERVER_BIN_DIR": str(PG_BIN),
        "OPS_WAL__SCRATCH_DIR": str(shared_dir / "scratch"),
        "OPS_RUNTIME__KIND": "none",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def test_drill_matches_the_backup_then_fails_on_a_tampered_manifest(
    drill_env: dict[str, Any], wal_cluster: WalCluster, shared_dir: Path
) -> None:
    # No archive at all: nothing to prove, and the run says so without failing.
    idle = pitr_drill(return_state=True)
    assert idle.is_completed(), idle.message
    assert idle.result()["ran"] is False
    assert "no point-in-time archive" in idle.result()["reason"]

    settings = pitr_settings(wal_cluster, drill_env["OPS_STORAGE__URL"], shared_dir / "spool")
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    writer = Writer(wal_cluster.dsn("app"))
    writer.setup()
    wal_cluster.execute("CREATE TABLE notes (k int PRIMARY KEY, v text)")
    wal_cluster.execute("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 50) g")
    wal_cluster.execute(
        "CREATE TABLE tags AS SELECT g AS id, 'tag' || g AS name FROM generate_series(1, 5) g"
    )
    with running_archiver(settings):
        writer.write(10)
        based = backup_base(wait_for_wal_seconds=30, prune=False, return_state=True)
        assert based.is_completed(), based.message
        writer.write(10)
        backed = backup_database(verify="checksum", prune=False, return_state=True)
        assert backed.is_completed(), backed.message
        manifest = backed.result()
        assert manifest["snapshot_lsn"]
        assert manifest["snapshot_timeline"] == 1
        _archived_up_to_now(wal_cluster, storage)
        # Written after the snapshot (into the next segment, archived as the growing one): a recovery
        # that overshot the snapshot would count them.
        writer.write(15)
        wal_cluster.execute("UPDATE notes SET v = 'changed' WHERE k = 7")
        growing = str(wal_cluster.execute("SELECT pg_walfile_name(pg_current_wal_lsn())", "postgres")[0][0])
        wait_for(lambda: growing in archive.list_archive(storage).partials, what=f"{growing} partial shipped")

    passed = pitr_drill(return_state=True)
    assert passed.is_completed(), passed.message
    result = passed.result()
    assert result["backup_id"] == manifest["id"]
    by_table = {row["table"]: row for row in result["tables"]}
    assert by_table["public.events"]["recovered_rows"] == 20
    assert by_table["public.notes"]["recovered_hash"] == manifest["tables"]["public.notes"]["content_hash"]
    assert {row["result"] for row in result["tables"]} == {"equal"}
    assert list((shared_dir / "scratch").iterdir()) == []  # the scratch instance is gone

    # The archiver stopped after shipping the growing segment: nothing after this snapshot is archived.
    newer = backup_database(verify="none", prune=False, return_state=True).result()
    tampered = json.loads(storage.get_bytes(manifest_key(newer["id"])))
    tampered["tables"]["public.events"]["rows"] += 1
    tampered["tables"]["public.notes"]["content_hash"] = "12345"
    storage.put_bytes(manifest_key(newer["id"]), json.dumps(tampered).encode())
    failed = pitr_drill(return_state=True)
    assert failed.is_failed()
    message = str(failed.message)
    assert newer["id"] in message
    assert (
        "in 2 tables: public.events: 35 rows, backup has 36; public.notes: content hash differs." in message
    )
    assert "replay went to its end" in message
