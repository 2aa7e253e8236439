"""The benchmark harness: time (and measure peak memory of) a raw tool and the project's equivalent
alternately in one run, then print medians and the ratio project / raw.

Alternating the two (raw, project, raw, project, ...) spreads machine noise over both sides.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Sample:
    seconds: float
    peak_rss_mb: float | None = None
    size_bytes: int | None = None


@dataclass
class Side:
    label: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def median_rss_mb(self) -> float | None:
        values = [s.peak_rss_mb for s in self.samples if s.peak_rss_mb is not None]
        return statistics.median(values) if values else None

    @property
    def median_size(self) -> float | None:
        values = [s.size_bytes for s in self.samples if s.size_bytes is not None]
        return statistics.median(values) if values else None


def run_process(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> Sample:
    """Run a command to completion; wall time and the peak RSS of it and its children.

    Each call runs in a fresh child (python -c ... or the raw tool), so ru_maxrss of RUSAGE_CHILDREN is
    taken through a small wrapper that reports only that child's peak.
    """
    wrapper = [
        "python3",
        "-c",
        "import resource,subprocess,sys,json;"
        "r=subprocess.run(sys.argv[1:]);"
        "print(json.dumps({'rc':r.returncode,"
        "'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}),file=sys.stderr)",
        *argv,
    ]
    started = time.perf_counter()
    proc = subprocess.run(
        wrapper, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    seconds = time.perf_counter() - started
    last = proc.stderr.decode(errors="replace").strip().splitlines()[-1]
    info = json.loads(last)
    if info["rc"] != 0:
        raise RuntimeError(
            f"benchmark command failed ({info['rc']}): {' '.join(argv)}\n{proc.stderr.decode()[-2000:]}"
        )
    return Sample(seconds=seconds, peak_rss_mb=info["rss"] / 1024)


def run_callable(fn: Callable[[], int | None]) -> Sample:
    """Time an in-process callable; its return value, when an int, is recorded as a size in bytes."""
    started = time.perf_counter()
    size = fn()
    return Sample(seconds=time.perf_counter() - started, size_bytes=size if isinstance(size, int) else None)


def compare(
    name: str,
    raw: tuple[str, Callable[[], Sample]],
    project: tuple[str, Callable[[], Sample]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], None] | None = None,
) -> dict[str, object]:
    """Run raw and project alternately ``repeats`` times (after ``warmup`` rounds), print and return ratios.

    ``setup`` runs before every single measurement (e.g. to recreate the files a delete removed).
    """
    sides = (Side(raw[0]), Side(project[0]))
    for round_no in range(warmup + repeats):
        for side, (_, fn) in zip(sides, (raw, project), strict=True):
            if setup is not None:
                setup()
            sample = fn()
            if round_no >= warmup:
                side.samples.append(sample)
    raw_side, project_side = sides
    result: dict[str, object] = {
        "benchmark": name,
        "repeats": repeats,
        "raw": raw_side.label,
        "project": project_side.label,
        "raw_median_s": round(raw_side.median_seconds, 4),
        "project_median_s": round(project_side.median_seconds, 4),
        "time_ratio": round(project_side.median_seconds / raw_side.median_seconds, 3),
    }
    if raw_side.median_rss_mb and project_side.median_rss_mb:
        result["raw_peak_rss_mb"] = round(raw_side.median_rss_mb, 1)
        result["project_peak_rss_mb"] = round(project_side.median_rss_mb, 1)
    if raw_side.median_size and project_side.median_size:
        result["raw_size"] = int(raw_side.median_size)
        result["project_size"] = int(project_side.median_size)
        result["size_ratio"] = round(project_side.median_size / raw_side.median_size, 3)
    report(result, sides)
    return result


def report(result: dict[str, object], sides: Sequence[Side]) -> None:
    print(f"\n== {result['benchmark']} ({result['repeats']} runs each, alternating)")
    for side in sides:
        times = ", ".join(f"{s.seconds:.3f}" for s in side.samples)
        print(f"  {side.label:<48} median {side.median_seconds:8.3f}s   [{times}]")
    line = f"  ratio project/raw: time {result['time_ratio']}x"
    if "size_ratio" in result:
        line += f", size {result['size_ratio']}x"
    if "project_peak_rss_mb" in result:
        line += f", peak RSS {result['project_peak_rss_mb']} MB vs {result['raw_peak_rss_mb']} MB"
    print(line)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{result['benchmark']}.json"
    out.write_text(
        json.dumps({**result, "samples": [asdict(s) for side in sides for s in side.samples]}, indent=2)
    )


def peak_rss_mb_self() -> float:
    """Peak RSS of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
