"""Uploads cleanup vs the runbook's ``find``: dry-run scan, delete mode, and memory at 1,000,000 files.

- 200,000 empty files in nested directories (20 x 10 x 10 leaves of 100 files), half modified 60
  days ago and half 1 day ago, in a temporary directory removed afterwards.
- dry run: ``find ROOT -type f -mtime +30 | wc -l`` vs the flow's dry run, ``clean_uploads(...,
  confirm=False)`` (scan, protect patterns, JSON Lines plan written).
- delete: ``find ROOT -type f -mtime +30 -delete`` vs ``clean_uploads(mode="delete", confirm=True)``
  (the same plan, each file re-checked through descriptors, then unlinked by the deleting helper
  process while the scan goes on: wall time is the target, CPU time is printed too); the deleted half
  is recreated before every measurement (harness ``setup``).
- memory: peak RSS growth of the scan + plan in a fresh process at 200,000 and at 1,000,000 files,
  and at 200,000 files in one flat directory (multer's layout: the scan hands a directory on in
  batches, so a flat directory holds no more than a nested one).

Both sides are timed in this process around one call (the raw tool through ``subprocess.run``).

    python -m bench uploads
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import harness

DAY = 86400
FILES_PER_LEAF = 100


def _leaf_dirs(files: int) -> list[str]:
    leaves = max(1, files // FILES_PER_LEAF)
    top = max(1, leaves // 100)
    return [f"d{a:03d}/e{b}/f{c}" for a in range(top) for b in range(10) for c in range(10)][:leaves]


def make_tree(root: Path, files: int, *, only_old: bool = False) -> int:
    """Create (or complete) the tree; even-numbered files are old. Returns how many files were made."""
    now = time.time()
    old_times = (now - 60 * DAY, now - 60 * DAY)
    new_times = (now - 1 * DAY, now - 1 * DAY)
    made = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for leaf in _leaf_dirs(files):
        directory = root / leaf
        directory.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(0, FILES_PER_LEAF, 2 if only_old else 1):
                name = f"upload-{i:04d}.bin"
                try:
                    fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
                except FileExistsError:
                    continue
                os.close(fd)
                os.utime(name, old_times if i % 2 == 0 else new_times, dir_fd=dir_fd)
                made += 1
        finally:
            os.close(dir_fd)
    return made


def make_flat_tree(root: Path, files: int) -> None:
    """``files`` files in one directory (multer's default layout), even-numbered ones old."""
    now = time.time()
    root.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(files):
            name = f"{i:08x}-upload.bin"
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=dir_fd))
            when = now - (60 if i % 2 == 0 else 1) * DAY
            os.utime(name, (when, when), dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _settings(root: Path):
    from tasks.settings import UploadsSettings

    return UploadsSettings(root=root, protect=[".gitkeep", "keep/**"])


def project_run(root: Path, work: Path, cutoff: float, *, confirm: bool) -> int:
    """What the flow runs: plan (scan, protect patterns, JSON Lines) streamed into remove_planned."""
    from tasks import uploads

    run_id = uploads.new_run_id()
    plan_path = work / f"uploads-plan-{run_id}.jsonl"
    outcome = uploads.clean_uploads(
        _settings(root),
        None,
        root=root,
        cutoff=cutoff,
        run_id=run_id,
        plan_path=plan_path,
        mode="delete",
        confirm=confirm,
    )
    plan_path.unlink()
    assert outcome.removal.acted == outcome.plan.stats.planned, outcome
    return outcome.removal.acted


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return f"{kind} mounted at {best}"


def plain_walk(root: Path, cutoff: float) -> int:
    """A bare os.scandir walk counting old files: what the issue's "plain Python" figure measures."""
    count = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif (
                    entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff
                ):
                    count += 1
    return count


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# CPU seconds per side: on a busy machine wall time mostly measures the wait for a core.
CPU_SAMPLES: dict[str, list[float]] = {}


def _timed(label: str, fn: Callable[[], object]) -> harness.Sample:
    before = _cpu_seconds()
    sample = harness.run_callable(lambda: fn() and None)  # the count is not a size: time only
    CPU_SAMPLES.setdefault(label, []).append(_cpu_seconds() - before)
    return sample


def _cpu_ratio(raw: str, project: str, warmup: int = 1) -> dict[str, float]:
    # The raw side's samples accumulate over comparisons; its latest ones pair with this comparison.
    count = len(CPU_SAMPLES[project])
    raw_cpu = statistics.median(CPU_SAMPLES[raw][-count + warmup :])
    project_cpu = statistics.median(CPU_SAMPLES[project][warmup:])
    ratio = round(project_cpu / raw_cpu, 3)
    print(f"  CPU time (user+sys) medians: {project_cpu:.3f}s vs {raw_cpu:.3f}s, ratio {ratio}x")
    return {"raw_cpu_s": round(raw_cpu, 4), "project_cpu_s": round(project_cpu, 4), "cpu_ratio": ratio}


def scan_rss_child(root: str, plan_dir: str) -> None:
    """In a fresh process: peak RSS after imports, then after a dry run of ``root``; and the peak of
    Python allocations during the dry run (tracemalloc), which shows what the scan itself holds."""
    import tracemalloc

    from tasks import uploads  # noqa: F401 - imported before the baseline is taken

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    planned = project_run(Path(root), Path(plan_dir), time.time() - 30 * DAY, confirm=False)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scanned = sum(1 for _ in Path(root).rglob("*.bin"))
    print(
        json.dumps(
            {
                "scanned": scanned,
                "planned": planned,
                "baseline_mb": round(baseline / 1024, 1),
                "peak_mb": round(peak / 1024, 1),
                "growth_mb": round((peak - baseline) / 1024, 1),
                "python_peak_mb": round(traced_peak / 2**20, 2),
            }
        )
    )


def measure_rss(root: Path, work: Path) -> dict[str, float]:
    project = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_uploads", "--scan-rss", str(root), str(work)],
        cwd=project,
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(base: Path, results: list[dict[str, object]], memory: dict[str, object] | None) -> None:
    print(f"\n== uploads summary on {_fs_type(base)} (targets: dry run <= 2.0x, delete <= 1.3x, memory flat)")
    for result in results:
        print(f"  {result['benchmark']:<18} wall {result['time_ratio']}x, CPU {result['cpu_ratio']}x")
    if memory is not None:
        print(
            f"  {'uploads-memory':<18} peak RSS {memory['peak_mb_small']} MB at"
            f" {memory['files_small']} files, {memory['peak_mb_large']} MB at {memory['files_large']} files,"
            f" {memory['peak_mb_flat']} MB at {memory['files_small']} files in one directory"
        )
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    summary = {"filesystem": _fs_type(base), "results": results, "memory": memory}
    (harness.RESULTS_DIR / "uploads-summary.json").write_text(json.dumps(summary, indent=2))


def main(files: int = 200_000, big: int = 1_000_000) -> None:
    files = int(os.environ.get("BENCH_UPLOADS_FILES", files))
    big = int(os.environ.get("BENCH_UPLOADS_BIG", big))
    # BENCH_UPLOADS_DIR picks the filesystem (default: the temp directory, TMPDIR).
    base = Path(tempfile.mkdtemp(prefix="bench-uploads-", dir=os.environ.get("BENCH_UPLOADS_DIR")))
    print(f"benchmark directory {base} ({_fs_type(base)})")
    root, work = base / "uploads", base / "work"
    root.mkdir()
    work.mkdir()
    try:
        started = time.perf_counter()
        made = make_tree(root, files)
        print(f"created {made} files under {root} in {time.perf_counter() - started:.1f}s")
        cutoff = time.time() - 30 * DAY
        quoted = shlex.quote(str(root))
        count_cmd = ["sh", "-c", f"find {quoted} -type f -mtime +30 | wc -l"]
        expected = int(subprocess.run(count_cmd, check=True, capture_output=True, text=True).stdout)
        assert expected == files // 2, expected

        def raw_count() -> None:
            subprocess.run(count_cmd, check=True, stdout=subprocess.DEVNULL)

        def raw_delete() -> None:
            subprocess.run(["find", str(root), "-type", "f", "-mtime", "+30", "-delete"], check=True)

        def restore_old_half() -> None:
            make_tree(root, files, only_old=True)

        labels = {
            "count": "find -type f -mtime +30 | wc -l",
            "dry": "cleanup dry run (scan + plan file)",
            "delete_raw": "find -type f -mtime +30 -delete",
            "delete": "cleanup delete (plan + re-check + unlink)",
        }
        dry = harness.compare(
            "uploads-dry-run",
            (labels["count"], lambda: _timed(labels["count"], raw_count)),
            (
                labels["dry"],
                lambda: _timed(labels["dry"], lambda: project_run(root, work, cutoff, confirm=False)),
            ),
            repeats=5,
        )
        dry.update(_cpu_ratio(labels["count"], labels["dry"]))
        # The floor for any Python cleanup: a bare scandir walk that stats every file, nothing else.
        plain = harness.compare(
            "uploads-plain-scandir-walk",
            (labels["count"], lambda: _timed(labels["count"], raw_count)),
            (
                "plain Python scandir walk (reference)",
                lambda: _timed("plain", lambda: plain_walk(root, cutoff)),
            ),
            repeats=5,
        )
        plain.update(_cpu_ratio(labels["count"], "plain"))
        delete = harness.compare(
            "uploads-delete",
            (labels["delete_raw"], lambda: _timed(labels["delete_raw"], raw_delete)),
            (
                labels["delete"],
                lambda: _timed(labels["delete"], lambda: project_run(root, work, cutoff, confirm=True)),
            ),
            repeats=3,
            setup=restore_old_half,
        )
        delete.update(_cpu_ratio(labels["delete_raw"], labels["delete"]))
        results = [dry, plain, delete]
        if not big:
            _summary(base, results, None)
            return
        restore_old_half()
        small = measure_rss(root, work)
        shutil.rmtree(root)
        root.mkdir()
        started = time.perf_counter()
        make_tree(root, big)
        print(f"\ncreated {big} files in {time.perf_counter() - started:.1f}s")
        large = measure_rss(root, work)
        shutil.rmtree(root)
        make_flat_tree(root, files)
        flat = measure_rss(root, work)
        print("\n== uploads-memory (scan + plan in a fresh process; growth over the RSS after imports)")
        for side in (small, large, flat):
            print(
                f"  {side['scanned']:>9} files: peak RSS {side['peak_mb']} MB (growth over imports"
                f" {side['growth_mb']} MB), Python allocations peak {side['python_peak_mb']} MB"
            )
        memory = {
            "benchmark": "uploads-memory",
            "files_small": small["scanned"],
            "files_large": large["scanned"],
            "peak_mb_small": small["peak_mb"],
            "peak_mb_large": large["peak_mb"],
            "growth_mb_small": small["growth_mb"],
            "growth_mb_large": large["growth_mb"],
            "python_peak_mb_small": small["python_peak_mb"],
            "python_peak_mb_large": large["python_peak_mb"],
            "peak_mb_flat": flat["peak_mb"],
            "python_peak_mb_flat": flat["python_peak_mb"],
            "peak_ratio": round(large["peak_mb"] / small["peak_mb"], 3),
        }
        print(f"  peak ratio 1M/200k: {memory['peak_ratio']}x")
        _summary(base, results, memory)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--scan-rss":
        scan_rss_child(sys.argv[2], sys.argv[3])
    else:
        main()
