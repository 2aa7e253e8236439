"""The WAL archiver against a private PostgreSQL 15 cluster (1 MB segments): segments and the growing
partial reach the storage compressed and checksummed, a killed archiver loses nothing (the slot),
gaps and corrupt segments are named, and the same works on S3 (moto_server)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.storage import open_storage
from tasks.wal import archive
from tasks.wal.names import missing_segments
from tests.fixtures.pitr import WalCluster, pitr_settings, running_archiver, wait_slot_active
from tests.fixtures.s3 import s3_storage_section

pytestmark = pytest.mark.integration


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.1)


def _current_segment(cluster: WalCluster) -> str:
    return str(cluster.execute("SELECT pg_walfile_name(pg_current_wal_lsn())", "postgres")[0][0])


def _fill_and_switch(cluster: WalCluster, segments: int) -> list[str]:
    """Write into ``segments`` segments and switch after each; returns the names that were finished."""
    cluster.execute("CREATE TABLE IF NOT EXISTS filler (id serial, body text)")
    finished = []
    for _ in range(segments):
        cluster.execute("INSERT INTO filler (body) SELECT repeat('y', 500) FROM generate_series(1, 200)")
        finished.append(_current_segment(cluster))
        cluster.switch_wal()
    return finished


def test_archiver_ships_segments_and_the_partial_checksummed(
    wal_cluster: WalCluster, shared_dir: Path
) -> None:
    settings = pitr_settings(wal_cluster, f"file://{shared_dir / 'store'}", shared_dir / "spool")
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    with running_archiver(settings) as archiver:
        finished = _fill_and_switch(wal_cluster, 3)
        wait_for(
            lambda: set(finished) <= set(archive.list_archive(storage).segments), what="segments archived"
        )
        # The row written now sits in the current segment only: it reaches the archive as a partial.
        wal_cluster.execute("INSERT INTO filler (body) VALUES ('latest')")
        current = _current_segment(wal_cluster)
        wait_for(lambda: current in archive.list_archive(storage).partials, what="partial shipped")
        assert archiver.status.last_segment is not None  # type: ignore[attr-defined]
    listing = archive.list_archive(storage)
    assert archive.gaps(listing, 1 << 20) == []
    for name in finished:
        raw = archive.fetch(storage, name)
        assert len(raw) == 1 << 20
        record = archive.read_record(storage, name)
        assert record.size_bytes < record.raw_size_bytes  # compressed
    partial = archive.fetch(storage, current + ".partial")
    assert b"latest" in partial
    # Nothing left behind in the spool but the partial pg_receivewal resumes from.
    leftovers = [p.name for p in (shared_dir / "spool").iterdir() if p.name != "archiver-status.json"]
    assert leftovers == [current + ".partial"]


def test_a_killed_archiver_loses_no_segment(
    wal_cluster: WalCluster, shared_dir: Path, archiver_process: Any
) -> None:
    store = shared_dir / "store"
    settings = pitr_settings(wal_cluster, f"file://{store}", shared_dir / "spool")
    archiver_process.env.update(
        {
            "OPS_POSTGRES__DSN": wal_cluster.dsn("app"),
            "OPS_STORAGE__URL": f"file://{store}",
            "OPS_WAL__SPOOL_DIR": str(shared_dir / "spool"),
            "OPS_WAL__POLL_SECONDS": "0.2",
            "OPS_WAL__STATUS_INTERVAL_SECONDS": "1",
        }
    )
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    archiver_process.start()
    wait_slot_active(wal_cluster.dsn(), settings.wal.slot)  # type: ignore[attr-defined]
    first = _fill_and_switch(wal_cluster, 2)
    wait_for(lambda: set(first) <= set(archive.list_archive(storage).segments), what="first segments")
    archiver_process.kill()
    # While it is down the server keeps writing and switching; the slot holds the WAL back.
    during = _fill_and_switch(wal_cluster, 4)
    wal_cluster.execute("CHECKPOINT", "postgres")
    assert not set(during) & set(archive.list_archive(storage).segments)
    archiver_process.start()
    wait_for(
        lambda: set(during) <= set(archive.list_archive(storage).segments),
        timeout=60,
        what=f"segments written while the archiver was down\n{archiver_process.log()[-3000:]}",
    )
    names = sorted(archive.list_archive(storage).segments)
    assert missing_segments(names, 1 << 20) == []
    check = archive.check_segments(storage, [*first, *during])
    assert check.ok, check.summary()


def test_missing_and_corrupt_segments_are_named(wal_cluster: WalCluster, shared_dir: Path) -> None:
    store = shared_dir / "store"
    settings = pitr_settings(wal_cluster, f"file://{store}", shared_dir / "spool")
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    with running_archiver(settings):
        finished = _fill_and_switch(wal_cluster, 4)
        wait_for(lambda: set(finished) <= set(archive.list_archive(storage).segments), what="archived")
    gone, damaged = finished[1], finished[2]
    storage.delete(archive.record_key(gone))
    blob = bytearray((store / archive.data_key(damaged)).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (store / archive.data_key(damaged)).write_bytes(bytes(blob))

    check = archive.check_segments(storage, finished)
    assert check.missing == [gone]
    assert list(check.corrupt) == [damaged]
    assert gone in check.summary()
    assert damaged in check.summary()
    assert archive.gaps(archive.list_archive(storage), 1 << 20) == [gone]
    with pytest.raises(archive.SegmentCorrupt, match=damaged):
        archive.fetch(storage, damaged)


def test_archiver_ships_to_s3(
    wal_cluster: WalCluster, shared_dir: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    settings = pitr_settings(
        wal_cluster,
        f"s3://{s3_bucket}/prod",
        shared_dir / "spool",
        storage=s3_storage_section(moto_endpoint),
    )
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    with running_archiver(settings):
        finished = _fill_and_switch(wal_cluster, 2)
        wait_for(lambda: set(finished) <= set(archive.list_archive(storage).segments), what="archived on S3")
    assert archive.check_segments(storage, finished).ok


def test_restore_command_writes_the_checked_segment_or_fails(
    wal_cluster: WalCluster, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.wal import fetch

    store = shared_dir / "store"
    settings = pitr_settings(wal_cluster, f"file://{store}", shared_dir / "spool")
    storage = open_storage(settings.storage)  # type: ignore[attr-defined]
    with running_archiver(settings):
        finished = _fill_and_switch(wal_cluster, 2)
        wait_for(lambda: set(finished) <= set(archive.list_archive(storage).segments), what="archived")
    monkeypatch.setenv("OPS_STORAGE__URL", f"file://{store}")
    out = shared_dir / "RECOVERYXLOG"
    assert fetch.main([finished[0], str(out)]) == 0
    assert out.read_bytes() == archive.fetch(storage, finished[0])
    assert fetch.main(["00000009.history", str(shared_dir / "h")]) == 1
    blob = bytearray((store / archive.data_key(finished[1])).read_bytes())
    blob[-10] ^= 0xFF
    (store / archive.data_key(finished[1])).write_bytes(bytes(blob))
    assert fetch.main([finished[1], str(shared_dir / "bad")]) == 1
    assert not (shared_dir / "bad").exists()
