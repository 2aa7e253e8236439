"""Timelines: which timeline holds which part of the WAL, from the archived ``.history`` files.

A promotion (a standby, or a recovered cluster becoming primary) starts a new timeline at a switch
LSN and writes ``TTTTTTTT.history``: one line per ancestor, ``<parent timeline> <switch LSN>
<reason>``. The WAL a replay reads along timeline ``T`` is each ancestor's WAL up to its switch
LSN, then ``T``'s. Segments are read the way PostgreSQL reads them with
``recovery_target_timeline = 'latest'``: a segment comes from the newest timeline on the path that
had begun by that segment, so the segment holding a switch LSN comes from the new timeline (it
holds the old timeline's records up to the switch as well).

Pure functions over names and texts, plus :func:`archive_paths`, which reads the history files.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.storage import Storage
from tasks.wal import archive
from tasks.wal.names import Segment, WalNameError, format_lsn, parse_lsn, parse_segment


@dataclass(frozen=True)
class TimelineSwitch:
    """One line of a history file: ``parent`` ended, and its child began, at ``switch_lsn``."""

    parent: int
    switch_lsn: int
    reason: str = ""


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def parse_history(text: str) -> list[TimelineSwitch]:
    """The switches of a ``.history`` file, oldest first (blank lines and ``#`` comments skipped).

    Raises:
        WalNameError: a line is not ``<timeline> <LSN> [reason]`` or the switches go backwards.
    """
    switches: list[TimelineSwitch] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) < 2 or not fields[0].isdigit():
            raise WalNameError(f"{line!r} is not a timeline history line (<timeline> <LSN> <reason>)")
        switch = TimelineSwitch(int(fields[0]), parse_lsn(fields[1]), fields[2] if len(fields) > 2 else "")
        if switches and (switch.parent <= switches[-1].parent or switch.switch_lsn < switches[-1].switch_lsn):
            raise WalNameError(f"timeline history goes backwards at {line!r}")
        switches.append(switch)
    return switches


@dataclass(frozen=True)
class TimelineRange:
    """``timeline`` holds the WAL from ``begin`` up to (not including) ``end`` (None: still open)."""

    timeline: int
    begin: int
    end: int | None


@dataclass(frozen=True)
class TimelinePath:
    """The WAL of ``timeline`` as a replay reads it: its ancestors' ranges, then its own."""

    ranges: tuple[TimelineRange, ...]

    @classmethod
    def of(cls, timeline: int, switches: list[TimelineSwitch]) -> TimelinePath:
        ranges, begin = [], 0
        for switch in switches:
            ranges.append(TimelineRange(switch.parent, begin, switch.switch_lsn))
            begin = switch.switch_lsn
        ranges.append(TimelineRange(timeline, begin, None))
        return cls(tuple(ranges))

    @property
    def timeline(self) -> int:
        return self.ranges[-1].timeline

    @property
    def timelines(self) -> list[int]:
        return [r.timeline for r in self.ranges]

    def holds(self, timeline: int, lsn: int) -> bool:
        """Whether WAL position ``lsn`` of ``timeline`` is on this path (before that timeline's switch)."""
        return any(
            r.timeline == timeline and r.begin <= lsn and (r.end is None or lsn < r.end) for r in self.ranges
        )

    def timeline_at(self, lsn: int) -> int:
        """The timeline that wrote WAL position ``lsn`` on this path."""
        for r in self.ranges:
            if r.end is None or lsn < r.end:
                return r.timeline
        return self.timeline

    def segment_timeline(self, number: int, segment_size: int) -> int:
        """The timeline whose file of segment ``number`` a replay reads: the newest one begun by then."""
        chosen = self.ranges[0].timeline
        for r in self.ranges:
            if r.begin // segment_size <= number:
                chosen = r.timeline
        return chosen

    def segment(self, number: int, segment_size: int) -> Segment:
        return Segment(self.segment_timeline(number, segment_size), number, segment_size)

    def segments(self, first: int, last: int, segment_size: int) -> list[Segment]:
        """Segments ``first`` .. ``last`` (numbers, inclusive), each from the timeline a replay reads."""
        return [self.segment(n, segment_size) for n in range(first, last + 1)]

    def on_path(self, name: str, segment_size: int) -> bool:
        """Whether the archived segment ``name`` is the one a replay along this path reads."""
        seg = parse_segment(name, segment_size)
        return seg.timeline == self.segment_timeline(seg.number, segment_size)

    def describe(self) -> str:
        if len(self.ranges) == 1:
            return f"timeline {self.timeline}"
        steps = [f"timeline {r.timeline} until {format_lsn(r.end)}" for r in self.ranges if r.end is not None]
        return ", then ".join([*steps, f"timeline {self.timeline}"])


def read_history(storage: Storage, timeline: int) -> list[TimelineSwitch]:
    """The archived history of ``timeline`` (checked against its record); timeline 1 has none.

    Raises:
        SegmentMissing: not archived.
        SegmentCorrupt: it does not match its record.
        WalNameError: not a history file's content.
    """
    if timeline == 1:
        return []
    return parse_history(archive.fetch(storage, history_name(timeline)).decode("utf-8", errors="replace"))


def archive_timelines(listing: archive.ArchiveListing) -> list[int]:
    """Every timeline the archive holds a segment, a partial segment or a history file of."""
    return sorted({int(name[:8], 16) for name in [*listing.segments, *listing.partials, *listing.histories]})


def archive_paths(
    storage: Storage, listing: archive.ArchiveListing
) -> tuple[dict[int, TimelinePath], list[str]]:
    """The path of every archived timeline whose history can be read, and what is wrong with the others.

    Returns:
        (timeline -> path, problems): a timeline above 1 without a readable history file has no path
        (a replay cannot follow it) and is named in the problems.
    """
    paths: dict[int, TimelinePath] = {}
    problems: list[str] = []
    for timeline in archive_timelines(listing):
        if timeline > 1 and history_name(timeline) not in listing.histories:
            problems.append(
                f"timeline {timeline} has WAL in the archive but no {history_name(timeline)}: a replay cannot"
                " follow it (the archiver stores it when it streams the new timeline)"
            )
            continue
        try:
            paths[timeline] = TimelinePath.of(timeline, read_history(storage, timeline))
        except (archive.SegmentMissing, archive.SegmentCorrupt, WalNameError) as exc:
            problems.append(f"{history_name(timeline)} cannot be used: {exc}")
    return paths, problems


def latest_path(paths: dict[int, TimelinePath], timeline: int, lsn: int) -> TimelinePath:
    """The newest timeline's path that passes through WAL position ``lsn`` of ``timeline`` (a base
    backup's start): the timeline ``recovery_target_timeline = 'latest'`` ends on."""
    for newest in sorted(paths, reverse=True):
        if paths[newest].holds(timeline, lsn):
            return paths[newest]
    return TimelinePath.of(timeline, [])


def newest_path(paths: dict[int, TimelinePath]) -> TimelinePath | None:
    """The path of the newest archived timeline (None: the archive is empty)."""
    return paths[max(paths)] if paths else None


def path_names(
    path: TimelinePath, listing: archive.ArchiveListing, segment_size: int, *, partials: bool = True
) -> list[str]:
    """The archived segments (and, with ``partials``, partial segments) a replay along ``path`` reads."""
    names = [*listing.segments, *(listing.partials if partials else [])]
    return sorted(
        {n for n in names if path.on_path(n, segment_size)},
        key=lambda n: parse_segment(n, segment_size).number,
    )


def path_gaps(path: TimelinePath, listing: archive.ArchiveListing, segment_size: int) -> list[str]:
    """Segments a replay along ``path`` would miss between the first and the newest archived one on it
    (a partial counts only as the newest): a switch whose new timeline was archived late shows here."""
    names = path_names(path, listing, segment_size)
    if not names:
        return []
    first = parse_segment(names[0], segment_size).number
    last = parse_segment(names[-1], segment_size).number
    missing = []
    for seg in path.segments(first, last, segment_size):
        if seg.name in listing.segments or (seg.number == last and seg.name in listing.partials):
            continue
        missing.append(seg.name)
    return missing
