"""WAL archive lag (the RPO) under steady writes, and what the archive stores per hour and day.

    python -m bench rpo                                  # 300 s of load at the archiver's defaults
    python -m bench rpo --seconds 60 --partial-ship-seconds 2

A private cluster (``wal_level=replica``) runs ``python -m tasks.wal.archiver`` as a separate process,
as it runs in production (slot, pg_receivewal, file:// storage). The load is ``pgbench -R <tps>`` on a
small pgbench database plus a probe writer committing ``--probe-rate`` rows per second, each row
carrying a unique marker ``rpo-probe-<id>``. A sampler lists the archive every 0.1 s, reads each newly
stored segment or ``.partial`` (checked against its record, as a recovery would) and looks for the
markers in its WAL bytes: a probe commit is in the archive from the moment the record of the first
stored object holding its marker was written (the record is written last, after the data is fsynced).

Measures (explained in the output):

- commit-to-archive lag per probe commit: record time minus the time the commit returned; this is
  the RPO an operator gets: a server lost at that instant loses the commits not yet in the archive;
- the data-loss window sampled every 0.5 s: now minus the commit time of the newest archived probe;
- what ``check-wal-archive`` reports as RPO (the age of the newest archived WAL object), for comparison;
- the archive's stored bytes (zstd) per hour and per day of this load, its raw WAL, the archiver's CPU
  and its storage writes (objects put) per hour.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from bench import harness
from bench.cluster import BenchCluster, shared_dir, stop_process
from tasks.storage import LocalStorage

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(rb"rpo-probe-(\d{10})")
GOAL_MEDIAN_S = 2.0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def newest_marker(raw: bytes) -> int:
    """The highest probe id whose marker is in these WAL bytes (0: none). Every lower id is in them too:
    one writer commits the probes in order, so WAL holding probe N holds every probe before it."""
    return max((int(m.group(1)) for m in MARKER.finditer(raw)), default=0)


@dataclass
class Probes:
    """The probe writer: one row per commit, the time each commit returned (``time.time()``)."""

    dsn: str
    rate: float
    committed: dict[int, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def setup(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE rpo_probe (id bigint PRIMARY KEY, at timestamptz, marker text)")

    def run(self) -> None:
        interval = 1.0 / self.rate
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            next_at = time.monotonic()
            probe = 0
            while not self.stop.is_set():
                probe += 1
                conn.execute(
                    "INSERT INTO rpo_probe VALUES (%s, clock_timestamp(), %s)",
                    (probe, f"rpo-probe-{probe:010d}"),
                )
                self.committed[probe] = time.time()
                next_at += interval
                self.stop.wait(max(0.0, next_at - time.monotonic()))


@dataclass
class Sampler:
    """Watches the archive: when each probe first landed in it, and the state check-wal-archive reads."""

    store: Path
    probes: Probes
    archived_at: dict[int, float] = field(default_factory=dict)  # probe id -> record time
    observed_at: dict[int, float] = field(default_factory=dict)  # probe id -> when the sampler saw it
    loss_window: list[float] = field(default_factory=list)
    status_age: list[float] = field(default_factory=list)
    objects_seen: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    _seen: dict[str, float] = field(default_factory=dict)
    _newest: int = 0
    _storage: LocalStorage | None = None

    def _records(self) -> Iterator[tuple[str, float]]:
        wal = self.store / "wal"
        if not wal.is_dir():
            return
        for folder in wal.iterdir():
            if folder.name == "history" or not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name.endswith(".json"):
                    try:
                        yield entry.name.removesuffix(".json"), entry.stat().st_mtime
                    except FileNotFoundError:
                        continue

    def poll(self) -> None:
        from tasks.wal import archive

        storage = self._storage
        assert storage is not None
        for name, mtime in sorted(self._records(), key=lambda r: r[1]):
            if self._seen.get(name) == mtime:
                continue
            try:
                raw = archive.fetch(storage, name)
                again = (self.store / archive.record_key(name)).stat().st_mtime
            except (archive.SegmentMissing, archive.SegmentCorrupt, FileNotFoundError):
                continue  # replaced while read (the next ship of the partial): read it on the next pass
            if again != mtime:
                continue
            self._seen[name] = mtime
            self.objects_seen += 1
            newest = newest_marker(raw)
            now = time.time()
            for probe in range(self._newest + 1, newest + 1):
                self.archived_at[probe] = mtime
                self.observed_at[probe] = now
            self._newest = max(self._newest, newest)

    def run(self) -> None:
        self._storage = LocalStorage(self.store)
        last_sample = 0.0
        while not self.stop.is_set():
            self.poll()
            now = time.time()
            if now - last_sample >= 0.5 and self.probes.committed:
                last_sample = now
                if self._newest:
                    self.loss_window.append(now - self.probes.committed[self._newest])
                times = [mtime for _, mtime in self._records()]
                if times:
                    self.status_age.append(now - max(times))
            self.stop.wait(0.1)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (pg_receivewal), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    except FileNotFoundError:
        return 0.0
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _stored_bytes(store: Path) -> int:
    wal = store / "wal"
    return sum(p.stat().st_size for p in wal.rglob("*") if p.is_file()) if wal.is_dir() else 0


def _lsn(cluster: BenchCluster) -> int:
    return int(cluster.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])  # type: ignore[arg-type]


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        time.sleep(0.2)


def _summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (
        f"median {statistics.median(values):.2f} s, p90 {percentile(values, 0.9):.2f} s,"
        f" p99 {percentile(values, 0.99):.2f} s, max {max(values):.2f} s ({len(values)} samples)"
    )


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench rpo", description=__doc__.split("\n")[0])
    # 300 s from a checkpoint: one whole checkpoint cycle, full-page images included, as a day has them.
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the steady load")
    parser.add_argument("--tps", type=int, default=50, help="pgbench transactions per second (-R)")
    parser.add_argument("--scale", type=int, default=5, help="pgbench scale of the loaded database")
    parser.add_argument("--probe-rate", type=float, default=10.0, help="probe commits per second")
    parser.add_argument(
        "--partial-ship-seconds",
        type=float,
        default=None,
        help="OPS_WAL__PARTIAL_SHIP_SECONDS (default: the project's)",
    )
    parser.add_argument("--poll-seconds", type=float, default=None, help="OPS_WAL__POLL_SECONDS")
    args, _ = parser.parse_known_args(argv)
    return args


def main() -> int:
    args = _parse(sys.argv[1:])
    from tasks.settings import load_settings

    defaults = load_settings().wal
    ship = defaults.partial_ship_seconds if args.partial_ship_seconds is None else args.partial_ship_seconds
    poll = defaults.poll_seconds if args.poll_seconds is None else args.poll_seconds
    work = shared_dir("ops-bench-rpo-")
    store, spool = work / "store", work / "spool"
    cluster = BenchCluster("ops-bench-rpo-pg-", {"shared_buffers": "128MB"})
    archiver: subprocess.Popen[bytes] | None = None
    pgbench: subprocess.Popen[bytes] | None = None
    results: dict[str, object] = {"partial_ship_seconds": ship, "poll_seconds": poll}
    try:
        cluster.start()
        cluster.execute("CREATE DATABASE app")
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", str(args.scale), cluster.dsn("app")],
            check=True,
            capture_output=True,
        )
        probes = Probes(cluster.dsn("app"), args.probe_rate)
        probes.setup()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OPS_POSTGRES__DSN": cluster.dsn("app"),
            "OPS_STORAGE__URL": f"file://{store}",
            "OPS_WAL__SPOOL_DIR": str(spool),
            "OPS_WAL__PARTIAL_SHIP_SECONDS": str(ship),
            "OPS_WAL__POLL_SECONDS": str(poll),
        }
        log = (work / "archiver.log").open("ab")
        archiver = subprocess.Popen(
            [sys.executable, "-m", "tasks.wal.archiver"],
            cwd=ROOT,
            env=env,
            stderr=log,
            stdout=subprocess.DEVNULL,
        )
        _wait(lambda: _stored_bytes(store) > 0, 120, "the archiver's first shipped WAL")
        print(
            f"archiver running (partial_ship_seconds={ship}, poll_seconds={poll});"
            f" load: pgbench -R {args.tps} (scale {args.scale}) + {args.probe_rate:g} probe commits/s"
            f" for {args.seconds:.0f} s, from a checkpoint (checkpoint_timeout 5 min)",
            flush=True,
        )
        cluster.execute("CHECKPOINT")
        sampler = Sampler(store, probes)
        threads = [threading.Thread(target=t.run, daemon=True) for t in (sampler, probes)]
        stored_before, lsn_before, cpu_before = (
            _stored_bytes(store),
            _lsn(cluster),
            _cpu_seconds(archiver.pid),
        )
        started = time.monotonic()
        pgbench = subprocess.Popen(
            [
                "pgbench",
                "-n",
                "-c",
                "2",
                "-j",
                "1",
                "-R",
                str(args.tps),
                "-T",
                str(int(args.seconds)),
                cluster.dsn("app"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for thread in threads:
            thread.start()
        out, _ = pgbench.communicate(timeout=args.seconds + 600)
        probes.stop.set()
        elapsed = time.monotonic() - started
        lsn_after, cpu_after = _lsn(cluster), _cpu_seconds(archiver.pid)
        last = max(probes.committed)
        # The last probes: the next ship of the partial holds them (no new writes change it after).
        _wait(lambda: last in sampler.archived_at, ship + 60, f"probe {last} in the archive")
        stored_after = _stored_bytes(store)
        sampler.stop.set()
        for thread in threads:
            thread.join(timeout=30)
        tps = re.search(rb"tps = ([\d.]+)", out or b"")

        lags = [sampler.archived_at[i] - at for i, at in probes.committed.items() if i in sampler.archived_at]
        seen = [sampler.observed_at[i] - at for i, at in probes.committed.items() if i in sampler.observed_at]
        stored = stored_after - stored_before
        raw = lsn_after - lsn_before
        writes = sampler.objects_seen * 2  # data + record per shipped object
        results.update(
            {
                "seconds": round(elapsed, 1),
                "pgbench_tps": float(tps.group(1)) if tps else None,
                "probe_commits": len(probes.committed),
                "lag_median_s": round(statistics.median(lags), 3),
                "lag_p99_s": round(percentile(lags, 0.99), 3),
                "lag_observed_median_s": round(statistics.median(seen), 3),
                "loss_window_median_s": round(statistics.median(sampler.loss_window), 3),
                "status_age_median_s": round(statistics.median(sampler.status_age), 3),
                "raw_wal_bytes": raw,
                "stored_bytes": stored,
                "stored_per_hour": round(stored / elapsed * 3600),
                "stored_per_day": round(stored / elapsed * 86400),
                "archiver_cpu_s": round(cpu_after - cpu_before, 2),
                "objects_put_per_hour": round(writes / elapsed * 3600),
            }
        )
        hour, day = stored / elapsed * 3600, stored / elapsed * 86400
        print(
            f"\n== WAL archive lag (RPO), {len(lags)} probe commits over {elapsed:.0f} s"
            " (on a shared, loaded machine)"
        )
        print(f"  commit -> archived (record written):  {_summary(lags)}")
        print(f"  commit -> seen by the 0.1 s sampler:   {_summary(seen)}")
        print(
            f"  data-loss window (now - newest archived commit), every 0.5 s: {_summary(sampler.loss_window)}"
        )
        print(
            f"  check-wal-archive's RPO (age of the newest archived object): {_summary(sampler.status_age)}"
        )
        verdict = "met" if statistics.median(lags) <= GOAL_MEDIAN_S else "NOT met"
        print(
            f"  goal: median <= {GOAL_MEDIAN_S:.0f} s -> {verdict} (median {statistics.median(lags):.2f} s,"
            f" p99 {percentile(lags, 0.99):.2f} s)"
        )
        print(
            "  The honest RPO is the first line: how long a commit exists only on the server. The status age"
            " reads\n  only when an object was last stored, not what it holds, and grows on an idle server"
            " although nothing is at risk."
        )
        print(f"\n== archive cost of this load (pgbench {results['pgbench_tps'] or 0:.0f} tps + probes)")
        print(
            f"  raw WAL {raw / 1e6:.1f} MB, stored {stored / 1e6:.2f} MB"
            f" (zstd; {raw / max(stored, 1):.1f}x smaller)"
        )
        print(
            f"  stored per hour {hour / 1e6:.1f} MB, per day {day / 1e9:.2f} GB"
            f" (extrapolated from {elapsed:.0f} s)"
        )
        print(
            f"  archiver CPU {cpu_after - cpu_before:.1f} s in {elapsed:.0f} s"
            f" ({(cpu_after - cpu_before) / elapsed * 100:.1f}% of a core, pg_receivewal included);"
            f" {writes / elapsed * 3600:.0f} objects put per hour"
        )
        if shutil.which("pgbackrest"):
            print("  pgBackRest is installed but not measured by this benchmark")
        else:
            print("  pgBackRest: not installed on this machine (Debian package pgbackrest), not measured")
        harness.RESULTS_DIR.mkdir(exist_ok=True)
        (harness.RESULTS_DIR / "rpo.json").write_text(json.dumps(results, indent=2))
    finally:
        if pgbench is not None and pgbench.poll() is None:
            pgbench.kill()
            pgbench.wait(timeout=30)
        stop_process(archiver)
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
