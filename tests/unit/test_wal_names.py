"""WAL names and positions: segment arithmetic for 16 MB and 1 MB segments, LSNs, gap detection."""

from __future__ import annotations

import pytest

from tasks.wal.names import (
    WalNameError,
    format_lsn,
    missing_segments,
    parse_lsn,
    parse_segment,
    segment_of,
)

MB = 1 << 20


def test_segment_names_round_trip_for_both_segment_sizes() -> None:
    assert parse_segment("000000010000000000000003").number == 3
    assert parse_segment("0000000100000001000000FF").number == 0x1FF
    one_mb = parse_segment("000000010000000100000FFF", MB)
    assert one_mb.number == 4096 + 0xFFF
    assert one_mb.name == "000000010000000100000FFF"
    assert one_mb.next().name == "000000010000000200000000"
    with pytest.raises(WalNameError):
        parse_segment("000000010000000000000FFF")  # 0xFFF does not fit 16 MB segments
    with pytest.raises(WalNameError):
        parse_segment("00000001000000000000000G")


def test_lsn_to_segment() -> None:
    assert parse_lsn("0/3000148") == 0x3000148
    assert format_lsn(parse_lsn("1/A0")) == "1/A0"
    assert segment_of(parse_lsn("0/3000148"), 1, 16 * MB).name == "000000010000000000000003"
    assert segment_of(parse_lsn("0/3000148"), 2, MB).name == "000000020000000000000030"
    with pytest.raises(WalNameError):
        parse_lsn("3000148")


def test_gaps_are_per_timeline() -> None:
    names = [
        "000000010000000000000001",
        "000000010000000000000002",
        "000000010000000000000005",
        "000000020000000000000005",
        "000000020000000000000006",
    ]
    assert missing_segments(names, 16 * MB) == ["000000010000000000000003", "000000010000000000000004"]
    assert missing_segments(names[:2], 16 * MB) == []
