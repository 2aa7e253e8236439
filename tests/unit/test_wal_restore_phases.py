"""The phases of a restore to a point: each block's time is added to its phase in order, also when it
raises, and the report line names them."""

from __future__ import annotations

import pytest

from tasks.wal import scratch
from tasks.wal.scratch import Phases


class _Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_phases_add_up_in_order_and_count_a_failed_block(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(scratch.time, "monotonic", clock)
    phases = Phases()
    with phases.timed("unpack base backup"):
        clock.now += 2.5
    with phases.timed("copy rows"):
        clock.now += 4.0
    with phases.timed("unpack base backup"):  # a second block of the same phase adds to it
        clock.now += 0.5
    with pytest.raises(RuntimeError), phases.timed("build indexes and constraints"):
        clock.now += 1.25
        raise RuntimeError("pg_restore failed")
    assert phases.seconds == {
        "unpack base backup": 3.0,
        "copy rows": 4.0,
        "build indexes and constraints": 1.25,
    }
    assert (
        phases.describe() == "unpack base backup 3.0 s, copy rows 4.0 s, build indexes and constraints 1.2 s"
    )
    assert Phases().describe() == "-"
