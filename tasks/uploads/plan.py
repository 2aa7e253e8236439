"""The plan: the files that would go, written as JSON Lines while they stream past, with its
summary (counts, largest and oldest files)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_string  # the C encoder json.dumps uses
from pathlib import Path

from tasks.settings import UploadsSettings
from tasks.uploads.errors import PlanInvalid
from tasks.uploads.protect import ProtectMatcher
from tasks.uploads.records import FileEntry, _iso
from tasks.uploads.references import ReferenceChecker, select_unreferenced
from tasks.uploads.scan import ScanStats, scan_old_files

TOP_N = 20


@dataclass
class PlanSummary:
    """The plan of one run: counts, where the full list is, and its largest and oldest files."""

    run_id: str
    root: str
    cutoff: float
    plan_path: str
    stats: ScanStats
    largest: list[FileEntry] = field(default_factory=list)
    oldest: list[FileEntry] = field(default_factory=list)
    complete: bool = False

    @property
    def cutoff_iso(self) -> str:
        return _iso(self.cutoff)


class PlanWriter:
    """Writes plan entries as JSON Lines while they stream past, keeping the largest and oldest.

    The file is written under a temporary name and renamed when the plan is complete, so a plan cut
    short by an error is never mistaken for a whole one (the partial file is kept, as the record of
    what was already handled).
    """

    def __init__(self, path: Path, stats: ScanStats, *, top_n: int = TOP_N) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.stats = stats
        self.top_n = top_n
        self.largest: list[tuple[int, int, FileEntry]] = []
        self.oldest: list[tuple[int, int, FileEntry]] = []
        self.complete = False

    def tee(self, entries: Iterable[FileEntry]) -> Iterator[FileEntry]:
        """Yield ``entries`` unchanged, each written to the plan first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        largest, oldest, top_n = self.largest, self.oldest, self.top_n
        push, replace = heapq.heappush, heapq.heapreplace
        planned = planned_bytes = 0
        try:
            with self.partial.open("w", encoding="utf-8", buffering=1 << 20) as out:
                # Lines are joined and written in blocks: one write call per line costs more than
                # formatting the line.
                lines: list[str] = []
                add = lines.append
                for entry in entries:
                    rel, size, mtime_ns, dev, ino, ctime_ns = entry
                    if rel.isascii():
                        add(
                            f'{{"path":{_json_string(rel)},"size":{size},"mtime_ns":{mtime_ns},'
                            f'"dev":{dev},"ino":{ino},"ctime_ns":{ctime_ns}}}\n'
                        )
                    else:
                        add(entry.to_json_line())
                    if len(lines) >= 1024:
                        out.write("".join(lines))
                        lines.clear()
                    planned += 1
                    planned_bytes += size
                    # Heaps of (key, sequence, entry), smallest key on top; cheap reject first.
                    if len(largest) < top_n:
                        push(largest, (size, planned, entry))
                    elif size > largest[0][0]:
                        replace(largest, (size, planned, entry))
                    if len(oldest) < top_n:
                        push(oldest, (-mtime_ns, planned, entry))
                    elif -mtime_ns > oldest[0][0]:
                        replace(oldest, (-mtime_ns, planned, entry))
                    yield entry
                out.write("".join(lines))
            self.partial.replace(self.path)
            self.complete = True
        finally:
            self.stats.planned += planned
            self.stats.planned_bytes += planned_bytes

    def summary(self, run_id: str, root: Path, cutoff: float) -> PlanSummary:
        def ranked(heap: list) -> list[FileEntry]:
            return [entry for _, _, entry in sorted(heap, key=lambda item: (-item[0], item[1]))]

        return PlanSummary(
            run_id=run_id,
            root=str(root),
            cutoff=cutoff,
            plan_path=str(self.path if self.complete else self.partial),
            stats=self.stats,
            largest=ranked(self.largest),
            oldest=ranked(self.oldest),
            complete=self.complete,
        )


def iter_plan(
    uploads: UploadsSettings,
    references: ReferenceChecker | None,
    *,
    root: Path,
    cutoff: float,
    stats: ScanStats,
) -> Iterator[FileEntry]:
    """The plan as a stream: regular files older than ``cutoff``, not protected, not referenced."""
    old = scan_old_files(
        root,
        cutoff,
        stats,
        cross_filesystem=uploads.cross_filesystem,
        protect=ProtectMatcher(uploads.protect),
    )
    return old if references is None else select_unreferenced(old, stats, references)


def count_plan(path: Path) -> int:
    """How many entries a plan file holds (for progress)."""
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError as exc:
        raise PlanInvalid(f"cannot read plan {path}: {exc.strerror}") from None
