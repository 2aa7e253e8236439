"""Timelines from the storage alone (no server): history files parsed, segments planned across a
promotion (before the switch from the old timeline, the switch segment and after from the new one),
the window and the gaps along the newest timeline, and a new timeline without its history named."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tasks.settings import load_settings
from tasks.storage import Storage, open_storage
from tasks.wal import archive, recover, targets, timelines
from tasks.wal.base import BaseBackupManifest
from tasks.wal.base import write_manifest as write_base_manifest
from tasks.wal.names import WalNameError, parse_lsn

MB = 1 << 20
T0 = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)
# Timeline 2 began at 0/5000A0: in segment 5 of 1 MB segments.
HISTORY = "1\t0/5000A0\tno recovery target specified\n"


def test_history_lines_and_paths() -> None:
    switches = timelines.parse_history("1\t0/5000A0\tno recovery target specified\n\n3\t0/900000\tat lsn\n")
    assert [(s.parent, s.switch_lsn) for s in switches] == [(1, 0x5000A0), (3, 0x900000)]
    path = timelines.TimelinePath.of(4, switches)
    assert path.timelines == [1, 3, 4]
    assert path.timeline_at(0x5000A0 - 1) == 1
    assert path.timeline_at(0x5000A0) == 3
    assert path.timeline_at(0x900000) == 4
    # The segment holding a switch is read from the new timeline.
    assert [s.name for s in path.segments(4, 9, MB)] == [
        "000000010000000000000004",
        "000000030000000000000005",
        "000000030000000000000006",
        "000000030000000000000007",
        "000000030000000000000008",
        "000000040000000000000009",
    ]
    assert path.holds(1, 0x400000)
    assert not path.holds(1, 0x600000)
    assert path.holds(3, 0x600000)
    assert not path.holds(2, 0x100)
    assert path.describe() == "timeline 1 until 0/5000A0, then timeline 3 until 0/900000, then timeline 4"
    with pytest.raises(WalNameError):
        timelines.parse_history("1 0/5000A0 x\n1 0/6000000 y\n")
    with pytest.raises(WalNameError):
        timelines.parse_history("one 0/5000A0\n")


def _ship(storage: Storage, store: Path, work: Path, name: str, at: datetime) -> None:
    path = work / name.removesuffix(".partial")
    path.write_bytes(name.encode() * 10)
    archive.ship_file(storage, path, name=name)
    stamp = at.timestamp()
    for key in (archive.record_key(name), archive.data_key(name)):
        os.utime(store / key, (stamp, stamp))


def _promoted_archive(tmp_path: Path, *, tl2_from: int = 5) -> tuple[Any, Storage]:
    """Base backup on timeline 1 at segment 2; timeline 1 archived to 4 (its switch segment 5 only as
    partial), timeline 2 from ``tl2_from`` to 7 and its partial 8; one segment a minute from T0."""
    store, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    settings = load_settings(storage={"url": f"file://{store}"})
    storage = open_storage(settings.storage)
    write_base_manifest(
        storage,
        BaseBackupManifest(
            id="20261201T040000Z-cluster-aaaaaa",
            started_at=T0,
            finished_at=T0 + timedelta(seconds=5),
            size_bytes=1,
            raw_size_bytes=1,
            sha256="0" * 64,
            data_key="base/data/x.tar.zst",
            tool_version="pg_basebackup 15",
            server_version="15",
            timeline=1,
            start_lsn="0/200028",
            stop_lsn="0/200100",
            wal_segment_size=MB,
        ),
    )
    for n in range(2, 5):
        _ship(storage, store, work, f"0000000100000000000000{n:02X}", T0 + timedelta(minutes=n))
    _ship(storage, store, work, "000000010000000000000005.partial", T0 + timedelta(minutes=5))
    (work / "00000002.history").write_text(HISTORY)
    archive.ship_file(storage, work / "00000002.history")
    for n in range(tl2_from, 8):
        _ship(storage, store, work, f"0000000200000000000000{n:02X}", T0 + timedelta(minutes=n, seconds=30))
    _ship(storage, store, work, "000000020000000000000008.partial", T0 + timedelta(minutes=8, seconds=30))
    return settings, storage


def test_plan_crosses_the_promotion(tmp_path: Path) -> None:
    settings, storage = _promoted_archive(tmp_path)
    now = T0 + timedelta(hours=1)
    by_lsn = recover.plan_point_restore(
        settings, target_lsn="0/700010", database="app", storage=storage, now=now
    )
    assert by_lsn.segments == [
        "000000010000000000000002",
        "000000010000000000000003",
        "000000010000000000000004",
        "000000020000000000000005",
        "000000020000000000000006",
        "000000020000000000000007",
    ]
    assert by_lsn.check.ok
    assert by_lsn.timelines == "timeline 1 until 0/5000A0, then timeline 2"
    assert "along timeline 1 until 0/5000A0, then timeline 2" in by_lsn.steps()[1]
    # Between timeline 2's segments 6 (shipped 6:30) and 7 (7:30): replay to 7, from timeline 2.
    by_time = recover.plan_point_restore(
        settings, target_time=T0 + timedelta(minutes=7), database="app", storage=storage, now=now
    )
    assert by_time.segments[-2:] == ["000000020000000000000006", "000000020000000000000007"]
    # After the newest finished segment: the partial of timeline 2 ends the plan.
    newest = recover.plan_point_restore(
        settings, target_time=T0 + timedelta(minutes=8), database="app", storage=storage, now=now
    )
    assert newest.segments[-1] == "000000020000000000000008"
    assert newest.check.ok
    # Before the promotion: timeline 1 only.
    early = recover.plan_point_restore(
        settings, target_time=T0 + timedelta(minutes=3, seconds=30), database="app", storage=storage, now=now
    )
    assert early.segments == [
        "000000010000000000000002",
        "000000010000000000000003",
        "000000010000000000000004",
    ]


def test_window_and_gaps_follow_the_newest_timeline(tmp_path: Path) -> None:
    settings, storage = _promoted_archive(tmp_path, tl2_from=6)
    listing = archive.list_archive(storage)
    paths, problems = timelines.archive_paths(storage, listing)
    assert problems == []
    assert sorted(paths) == [1, 2]
    newest = timelines.newest_path(paths)
    assert newest is not None
    # Timeline 2 archived from segment 6: its switch segment 5 is missing, though no timeline alone
    # has a hole.
    assert archive.gaps(listing, MB) == []
    assert timelines.path_gaps(newest, listing, MB) == ["000000020000000000000005"]
    window = targets.restorable_window(
        [recover.list_base_backups(settings, storage=storage)[0]], listing, newest
    )
    assert window.end_wal == "000000020000000000000008"
    assert "along timeline 1 until 0/5000A0, then timeline 2" in window.describe()
    with pytest.raises(archive.WalArchiveError, match="000000020000000000000005"):
        recover.plan_point_restore(
            settings, target_lsn="0/700010", database="app", storage=storage, now=T0 + timedelta(hours=1)
        )


def test_a_timeline_without_its_history_is_named(tmp_path: Path) -> None:
    settings, storage = _promoted_archive(tmp_path)
    storage.delete(archive.record_key("00000002.history"))
    paths, problems = timelines.archive_paths(storage, archive.list_archive(storage))
    assert sorted(paths) == [1]
    assert len(problems) == 1
    assert "00000002.history" in problems[0]
    with pytest.raises(archive.WalArchiveError, match=r"00000002\.history"):
        recover.plan_point_restore(
            settings, target_lsn="0/700010", database="app", storage=storage, now=T0 + timedelta(hours=1)
        )
    assert timelines.latest_path(paths, 1, parse_lsn("0/200028")).timelines == [1]
