"""The WAL archiver when its slot cannot serve it, against a private PostgreSQL 15 cluster (1 MB
segments): a slot invalidated by ``max_slot_wal_keep_size`` while the archiver was down is reported
(status, diagnose) and the archiver recovers from it, recording the gap; an archiver that starts with
an empty spool and no slot (a new primary, a re-created slot) continues from where the archive ends
while the server still has that WAL, and records the gap when it does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.diagnose import Severity
from tasks.diagnose.wal_checks import wal_archive_findings
from tasks.storage import Storage, open_storage
from tasks.wal import archive
from tasks.wal.names import Segment, parse_segment
from tasks.wal.status import archive_status
from tests.fixtures.pitr import WalCluster, open_wal_cluster, pitr_settings, running_archiver
from tests.integration.test_wal_archiver import _fill_and_switch, wait_for

pytestmark = pytest.mark.integration
SEGMENT = 1 << 20


def _slot_wal_status(cluster: WalCluster, slot: str) -> object:
    rows = cluster.execute(
        f"SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'", "postgres"
    )
    return rows[0][0] if rows else None


def _next_after_newest_segment(storage: Storage) -> str:
    """The first segment the archive does not hold whole: the one after its newest finished segment."""
    newest = parse_segment(max(archive.list_archive(storage).segments), SEGMENT)
    return Segment(newest.timeline, newest.number + 1, SEGMENT).name


def _empty(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.mkdir()
    directory.chmod(0o777)


def test_a_lost_slot_is_reported_and_the_archiver_recovers_recording_the_gap(shared_dir: Path) -> None:
    with open_wal_cluster({"max_slot_wal_keep_size": "3MB"}) as cluster:
        settings = pitr_settings(cluster, f"file://{shared_dir / 'store'}", shared_dir / "spool")
        slot = settings.wal.slot  # type: ignore[attr-defined]
        storage = open_storage(settings.storage)  # type: ignore[attr-defined]
        with running_archiver(settings):
            first = _fill_and_switch(cluster, 2)
            wait_for(lambda: set(first) <= set(archive.list_archive(storage).segments), what="first segments")
            # Stopped in the middle of a segment: the spool keeps its partial, to resume from.
            cluster.execute("INSERT INTO filler (body) VALUES ('tail')")
            wait_for(lambda: archive.list_archive(storage).partials, what="partial shipped")
        first_missing = _next_after_newest_segment(storage)
        assert (shared_dir / "spool" / f"{first_missing}.partial").exists()
        # Down too long: the server writes past max_slot_wal_keep_size. Until the next checkpoint
        # the slot's WAL is still there but no longer kept ("unreserved"): a warning.
        _fill_and_switch(cluster, 8)
        assert _slot_wal_status(cluster, slot) == "unreserved"
        status = archive_status(settings)  # type: ignore[arg-type]
        assert status.slot is not None
        assert status.slot.wal_status == "unreserved"
        assert status.slot.safe_wal_size is not None
        assert status.slot.safe_wal_size < 0
        unreserved = [p for p in status.problems if "unreserved" in p]
        assert unreserved, status.problems
        findings = [f for f in wal_archive_findings(status) if "unreserved" in f.summary]
        assert findings
        assert findings[0].severity is Severity.WARNING
        # The checkpoint removes it: the slot is lost.
        cluster.execute("CHECKPOINT", "postgres")
        assert _slot_wal_status(cluster, slot) == "lost", cluster.log()[-2000:]

        status = archive_status(settings)  # type: ignore[arg-type]
        assert status.slot is not None
        assert status.slot.wal_status == "lost"
        lost = [p for p in status.problems if "lost" in p]
        assert lost, status.problems
        assert "base backup" in lost[0]
        assert "archiver" in lost[0]
        findings = [f for f in wal_archive_findings(status) if "lost" in f.summary]
        assert findings
        assert findings[0].severity is Severity.CRITICAL

        with running_archiver(settings) as archiver:
            after = _fill_and_switch(cluster, 2)
            wait_for(
                lambda: set(after) <= set(archive.list_archive(storage).segments),
                timeout=60,
                what="segments written after the recovery",
            )
            gaps = list(archiver.status.gaps)  # type: ignore[attr-defined]
        assert len(gaps) == 1, gaps
        assert gaps[0].startswith(first_missing), (gaps, first_missing)
        assert _slot_wal_status(cluster, slot) in ("reserved", "extended")
        recorded = (shared_dir / "spool" / "archiver-status.json").read_text()
        assert first_missing in recorded
        after_status = archive_status(settings)  # type: ignore[arg-type]
        assert not [p for p in after_status.problems if "lost" in p], after_status.problems
        # The hole stays in the archive, named, until a new base backup starts after it.
        assert first_missing in after_status.gaps


def test_an_archiver_without_slot_and_spool_continues_where_the_archive_ends(shared_dir: Path) -> None:
    with open_wal_cluster({"wal_keep_size": "64MB"}) as cluster:
        spool = shared_dir / "spool"
        settings = pitr_settings(cluster, f"file://{shared_dir / 'store'}", spool)
        slot = settings.wal.slot  # type: ignore[attr-defined]
        storage = open_storage(settings.storage)  # type: ignore[attr-defined]
        with running_archiver(settings):
            first = _fill_and_switch(cluster, 2)
            wait_for(lambda: set(first) <= set(archive.list_archive(storage).segments), what="first segments")
        # As on a new primary: no slot, no spool; the server writes on (and keeps it: wal_keep_size).
        cluster.execute(f"SELECT pg_drop_replication_slot('{slot}')", "postgres")
        _empty(spool)
        during = _fill_and_switch(cluster, 4)
        cluster.execute("CHECKPOINT", "postgres")
        with running_archiver(settings) as archiver:
            after = _fill_and_switch(cluster, 1)
            wait_for(
                lambda: set(during + after) <= set(archive.list_archive(storage).segments),
                timeout=60,
                what="every segment written while there was no slot",
            )
            gaps = list(archiver.status.gaps)  # type: ignore[attr-defined]
        assert gaps == []
        listing = archive.list_archive(storage)
        assert archive.gaps(listing, SEGMENT) == []
        assert archive.check_segments(storage, [*first, *during, *after]).ok


@pytest.mark.parametrize("role", ["postgres", "replicator"])
def test_an_archiver_without_slot_and_spool_records_the_gap_the_server_no_longer_has(
    shared_dir: Path, role: str
) -> None:
    # As the superuser the archiver sees pg_wal (pg_ls_waldir); a replication role without
    # pg_monitor cannot, so pg_receivewal's failed start tells it that the WAL is gone.
    with open_wal_cluster({"max_wal_size": "32MB", "min_wal_size": "2MB"}) as cluster:
        spool = shared_dir / "spool"
        wal: dict[str, object] = {}
        if role != "postgres":
            cluster.execute(f"CREATE ROLE {role} LOGIN REPLICATION", "postgres")
            wal["replication_dsn"] = cluster.dsn("postgres").replace("postgres@", f"{role}@", 1)
        settings = pitr_settings(cluster, f"file://{shared_dir / 'store'}", spool, wal=wal)
        slot = settings.wal.slot  # type: ignore[attr-defined]
        storage = open_storage(settings.storage)  # type: ignore[attr-defined]
        with running_archiver(settings):
            first = _fill_and_switch(cluster, 2)
            wait_for(lambda: set(first) <= set(archive.list_archive(storage).segments), what="first segments")
        first_missing = _next_after_newest_segment(storage)
        cluster.execute(f"SELECT pg_drop_replication_slot('{slot}')", "postgres")
        _empty(spool)
        # Nothing keeps the WAL now: enough segments and checkpoints remove the archive's next one.
        _fill_and_switch(cluster, 40)
        cluster.execute("CHECKPOINT", "postgres")
        cluster.execute("CHECKPOINT", "postgres")
        with running_archiver(settings) as archiver:
            after = _fill_and_switch(cluster, 2)
            wait_for(
                lambda: set(after) <= set(archive.list_archive(storage).segments),
                timeout=60,
                what="segments written after the start",
            )
            gaps = list(archiver.status.gaps)  # type: ignore[attr-defined]
        assert len(gaps) == 1, gaps
        assert gaps[0].startswith(first_missing), (gaps, first_missing)
