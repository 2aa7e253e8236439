"""The archiver's cadence for the growing (.partial) segment: the interval counts from the start of a
ship, so a slow ship (compress, checksum, upload on a busy host) does not stretch the RPO, and the
loop wakes when the partial is due instead of at the next poll. A fake clock, no server: the partial
is a file in the spool and the storage a local directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.settings import load_settings
from tasks.storage import LocalStorage
from tasks.wal import archive
from tasks.wal.archiver import Archiver, pass_wait

PARTIAL = "000000010000000000000003.partial"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _SlowStorage(LocalStorage):
    """Each object put takes ``seconds`` of the fake clock."""

    def __init__(self, root: Path, clock: _Clock, seconds: float) -> None:
        super().__init__(root)
        self.clock = clock
        self.seconds = seconds

    def put_bytes(self, key: str, data: bytes) -> None:
        super().put_bytes(key, data)
        self.clock.now += self.seconds


def _archiver(tmp_path: Path, clock: _Clock, put_seconds: float) -> Archiver:
    settings = load_settings(
        wal={"spool_dir": str(tmp_path / "spool"), "partial_ship_seconds": 2.0, "poll_seconds": 0.5}
    )
    archiver = Archiver(settings, storage=_SlowStorage(tmp_path / "store", clock, put_seconds))
    archiver.clock = clock
    archiver.spool.mkdir()
    return archiver


def _grow(archiver: Archiver, data: bytes) -> None:
    with (archiver.spool / PARTIAL).open("ab") as handle:
        handle.write(data)


def test_a_slow_ship_does_not_stretch_the_partial_interval(tmp_path: Path) -> None:
    clock = _Clock()
    archiver = _archiver(tmp_path, clock, put_seconds=0.6)  # data + record: 1.2 s per ship
    _grow(archiver, b"a" * 100)
    assert archiver.ship_partial() == PARTIAL
    first = clock.now
    _grow(archiver, b"b" * 100)
    # 2 s after the first ship began (0.8 s after it ended) the next one is due.
    clock.now = first - 1.2 + 2.0
    assert archiver.ship_partial() == PARTIAL
    assert archive.fetch(archiver.storage, PARTIAL) == b"a" * 100 + b"b" * 100


def test_the_partial_is_not_shipped_before_its_interval_or_unchanged(tmp_path: Path) -> None:
    clock = _Clock()
    archiver = _archiver(tmp_path, clock, put_seconds=0.0)
    _grow(archiver, b"a" * 100)
    assert archiver.ship_partial() == PARTIAL
    _grow(archiver, b"b" * 100)
    clock.now += 1.9
    assert archiver.ship_partial() is None
    clock.now += 5
    assert archiver.ship_partial() == PARTIAL
    clock.now += 5
    assert archiver.ship_partial() is None  # nothing new since


def test_the_loop_wakes_when_the_partial_is_due() -> None:
    # Shipped at 100 with a 2 s interval: polls of 0.5 s until 1.8, then only the 0.2 s left.
    assert pass_wait(100.0, 100.0, 2.0, 0.5) == 0.5
    assert pass_wait(101.8, 100.0, 2.0, 0.5) == pytest.approx(0.2)
    # Due but the partial had not changed: back to polling, never a busy loop.
    assert pass_wait(102.0, 100.0, 2.0, 0.5) == 0.5
    assert pass_wait(107.0, 100.0, 2.0, 0.5) == 0.5
    # Partial shipping off (0: on exit only): plain polling.
    assert pass_wait(101.9, 100.0, 0.0, 0.5) == 0.5
    # An interval shorter than the poll sets the cadence.
    assert pass_wait(100.1, 100.0, 0.3, 0.5) == pytest.approx(0.2)


def test_the_default_cadence_keeps_the_median_rpo_within_two_seconds() -> None:
    # A commit waits on average half an interval for the next ship, then the ship itself (measured by
    # `python -m bench rpo`: at 2 s, median 1.25 s; at the former 5 s, 2.6 s).
    assert load_settings().wal.partial_ship_seconds <= 2.0
