"""WAL file names and positions: pure functions, no I/O.

A segment name is ``TTTTTTTTXXXXXXXXYYYYYYYY`` (timeline, then the segment number split in two at
``0x100000000 / segment size``); a timeline history file is ``TTTTTTTT.history``. An LSN is written
``X/Y`` (two hex halves of a 64-bit byte position).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
PARTIAL_SUFFIX = ".partial"
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024


class WalNameError(ValueError):
    """Not a WAL segment name or LSN."""


@dataclass(frozen=True, order=True)
class Segment:
    """One WAL segment: its timeline and its position in the WAL (``number``, counted in segments)."""

    timeline: int
    number: int
    segment_size: int = DEFAULT_SEGMENT_SIZE

    @property
    def name(self) -> str:
        per_id = 0x100000000 // self.segment_size
        return f"{self.timeline:08X}{self.number // per_id:08X}{self.number % per_id:08X}"

    @property
    def start_lsn(self) -> int:
        return self.number * self.segment_size

    def next(self) -> Segment:
        return Segment(self.timeline, self.number + 1, self.segment_size)


def is_segment_name(name: str) -> bool:
    return bool(SEGMENT_RE.match(name))


def is_history_name(name: str) -> bool:
    return bool(HISTORY_RE.match(name))


def parse_segment(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
    """The segment a 24-hex-digit name stands for.

    Raises:
        WalNameError: not a segment name, or a low part too large for ``segment_size``.
    """
    if not is_segment_name(name):
        raise WalNameError(f"{name!r} is not a WAL segment name (24 hex digits)")
    per_id = 0x100000000 // segment_size
    timeline, high, low = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    if low >= per_id:
        raise WalNameError(f"{name!r} does not fit {segment_size}-byte segments")
    return Segment(timeline, high * per_id + low, segment_size)


def parse_lsn(text: str) -> int:
    """``'0/3000148'`` as a byte position.

    Raises:
        WalNameError: not ``hex/hex``.
    """
    high, sep, low = text.strip().partition("/")
    if not sep or not re.fullmatch(r"[0-9A-Fa-f]{1,8}", high) or not re.fullmatch(r"[0-9A-Fa-f]{1,8}", low):
        raise WalNameError(f"{text!r} is not an LSN (like 0/3000148)")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def segment_of(position: int, timeline: int, segment_size: int) -> Segment:
    """The segment holding byte ``position`` of the WAL on ``timeline``."""
    return Segment(timeline, position // segment_size, segment_size)


def missing_segments(names: list[str], segment_size: int) -> list[str]:
    """Segment names absent between the first and the last of each timeline in ``names``.

    A timeline switch is not a gap: each timeline is checked over its own range.
    """
    by_timeline: dict[int, set[int]] = {}
    for name in names:
        seg = parse_segment(name, segment_size)
        by_timeline.setdefault(seg.timeline, set()).add(seg.number)
    missing = []
    for timeline, numbers in sorted(by_timeline.items()):
        for number in range(min(numbers), max(numbers) + 1):
            if number not in numbers:
                missing.append(Segment(timeline, number, segment_size).name)
    return missing


def segments_between(first: Segment, last: Segment) -> list[Segment]:
    """Every segment from ``first`` to ``last`` inclusive on ``first``'s timeline."""
    return [Segment(first.timeline, n, first.segment_size) for n in range(first.number, last.number + 1)]
