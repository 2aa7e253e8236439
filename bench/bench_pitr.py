"""Restore to a point vs a logical restore of the same data.

    python -m bench pitr                    # a 1.7 GB database (pgbench + a JSONB table)
    python -m bench pitr --size-mb 200      # a smaller one
    python -m bench pitr --size-mb 200 --repeats 2 --wal-mb 64

On a private cluster (``wal_level=replica``) with the WAL archiver running as a separate process
(``python -m tasks.wal.archiver``, file:// storage): the database ``app`` is loaded, a base backup
taken (``create_base_backup``), then ``--wal-mb`` of WAL written by pgbench; the writes stop, the
target time is taken and ``pg_dump -Fc`` dumps the data as it is then; more writes and a DELETE
follow (recovery must stop before them), and the archive is brought up to date.

Measured alternately, ``--repeats`` times each:

- raw: ``pg_restore -j 2`` of that dump into a fresh database on the same cluster;
- project: ``restore_to_point(target_time=...)``: plan and check every archived segment, unpack the
  base backup, replay the WAL in a scratch PostgreSQL, copy the database into a new one on the app's
  cluster, compare every table (counts and content hashes), swap it in. Its phases are printed.

Target (DESIGN.md): restore to a point <= 1.0x the logical restore. Both restored databases are
checked to hold the same row counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from bench import harness
from bench.cluster import PG_BIN, BenchCluster, shared_dir, stop_process

if TYPE_CHECKING:
    from tasks.settings import OpsSettings
    from tasks.wal.recover import PointRestoreResult

ROOT = Path(__file__).resolve().parent.parent
# pgbench scale 1 plus 4000 rows of bench_docs come to about 17 MB (bench_backup's database: scale 100).
MB_PER_SCALE = 17


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench pitr", description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1700, help="size of the database to restore")
    parser.add_argument("--wal-mb", type=int, default=64, help="WAL written after the base backup (replayed)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each side")
    parser.add_argument("--dir", type=Path, default=None, help="where the cluster, storage and dump go")
    args, _ = parser.parse_known_args(argv)
    return args


def _load(cluster: BenchCluster, scale: int) -> None:
    """pgbench tables at ``scale`` and a JSONB table of 4000 rows per scale (as bench_backup's)."""
    subprocess.run(
        ["pgbench", "-i", "-q", "-s", str(scale), cluster.dsn("app")], check=True, capture_output=True
    )
    with psycopg.connect(cluster.dsn("app"), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_docs"
            " (id bigint PRIMARY KEY, created timestamptz NOT NULL, doc jsonb NOT NULL)"
        )
        conn.execute(
            "INSERT INTO bench_docs SELECT g, now() - g * interval '1 second',"
            " jsonb_build_object('id', g, 'name', 'user-' || g, 'email', 'user' || g || '@example.com',"
            "  'tags', jsonb_build_array('a' || (g % 17), 'b' || (g % 31), 'c' || (g % 7)),"
            "  'address', jsonb_build_object('street', md5(g::text), 'zip', lpad((g % 99999)::text, 5, '0')),"
            "  'score', (g % 1000) / 7.0, 'active', g % 3 = 0, 'payload', repeat(md5((g * 7)::text), 4))"
            f" FROM generate_series(1, {4000 * scale}) g"
        )
        conn.execute("CREATE INDEX bench_docs_created ON bench_docs (created)")
        conn.execute("VACUUM ANALYZE")


def _lsn(cluster: BenchCluster) -> int:
    return int(cluster.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])  # type: ignore[arg-type]


def _write_wal(cluster: BenchCluster, megabytes: int) -> None:
    """Run pgbench until the server has written ``megabytes`` of WAL."""
    start = _lsn(cluster)
    proc = subprocess.Popen(
        ["pgbench", "-n", "-c", "2", "-j", "1", "-T", "3600", cluster.dsn("app")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while _lsn(cluster) - start < megabytes << 20:
            if proc.poll() is not None:
                raise RuntimeError(f"pgbench exited {proc.returncode}")
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def _settings(cluster: BenchCluster, store: Path, work: Path) -> OpsSettings:
    from tasks.settings import load_settings

    return load_settings(
        postgres={"dsn": cluster.dsn("app"), "statement_timeout_seconds": 3600},
        storage={"url": f"file://{store}"},
        wal={"spool_dir": str(work / "spool"), "server_bin_dir": str(PG_BIN), "scratch_dir": str(work)},
        backup={"spool_dir": str(work / "spool-backup")},
    )


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        time.sleep(0.2)


def _counts(cluster: BenchCluster, database: str) -> dict[str, int]:
    with psycopg.connect(cluster.dsn(database), autocommit=True) as conn:
        tables = conn.execute("SELECT schemaname, relname FROM pg_stat_user_tables ORDER BY 1, 2").fetchall()
        return {
            f"{s}.{t}": int(conn.execute(f'SELECT count(*) FROM "{s}"."{t}"').fetchone()[0])  # type: ignore[index]
            for s, t in tables
        }


def _drop(cluster: BenchCluster, database: str) -> None:
    cluster.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@dataclass
class Prepared:
    """A cluster with ``app``, a base backup and archived WAL past ``target``, and a dump taken at it."""

    cluster: BenchCluster
    work: Path
    settings: OpsSettings
    target: datetime
    dump: Path
    expected: dict[str, int]
    results: dict[str, object] = field(default_factory=dict)


@contextlib.contextmanager
def prepared(size_mb: int, wal_mb: int, parent: Path | None = None) -> Iterator[Prepared]:
    """Set up (see the module's docstring); everything is stopped by PID and removed afterwards."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = shared_dir("ops-bench-pitr-", parent)
    store = work / "store"
    dump = work / "app.dump"
    cluster = BenchCluster("ops-bench-pitr-pg-", {"shared_buffers": "256MB", "max_wal_size": "2GB"}, parent)
    archiver: subprocess.Popen[bytes] | None = None
    results: dict[str, object] = {"size_mb_asked": size_mb, "wal_mb": wal_mb}
    try:
        cluster.start()
        cluster.execute("CREATE DATABASE app")
        scale = max(1, round(size_mb / MB_PER_SCALE))
        started = time.monotonic()
        _load(cluster, scale)
        size = int(cluster.execute("SELECT pg_database_size('app')")[0][0])  # type: ignore[arg-type]
        print(
            f"setup: app loaded (pgbench scale {scale} + bench_docs) in {time.monotonic() - started:.0f} s;"
            f" {size / 1e6:.0f} MB",
            flush=True,
        )
        results["database_bytes"] = size

        settings = _settings(cluster, store, work)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OPS_POSTGRES__DSN": cluster.dsn("app"),
            "OPS_STORAGE__URL": f"file://{store}",
            "OPS_WAL__SPOOL_DIR": str(work / "spool"),
        }
        archiver = subprocess.Popen(
            [sys.executable, "-m", "tasks.wal.archiver"],
            cwd=ROOT,
            env=env,
            stderr=(work / "archiver.log").open("ab"),
            stdout=subprocess.DEVNULL,
        )
        from tasks.storage import open_storage
        from tasks.wal import archive, base

        storage = open_storage(settings.storage)
        _wait(
            lambda: archive.list_archive(storage).partials or archive.list_archive(storage).segments,
            120,
            "the archiver's first WAL",
        )
        started = time.monotonic()
        manifest = base.create_base_backup(settings, storage=storage)
        print(
            f"setup: base backup {manifest.id} in {time.monotonic() - started:.0f} s,"
            f" {manifest.size_bytes / 1e6:.0f} MB stored",
            flush=True,
        )
        results["base_backup_stored_bytes"] = manifest.size_bytes
        started = time.monotonic()
        _write_wal(cluster, wal_mb)
        print(
            f"setup: {wal_mb} MB of WAL written by pgbench in {time.monotonic() - started:.0f} s", flush=True
        )
        time.sleep(1)
        target = datetime.now(UTC)
        time.sleep(1)
        subprocess.run(["pg_dump", "-Fc", "-f", str(dump), cluster.dsn("app")], check=True)
        results["dump_bytes"] = dump.stat().st_size
        expected = _counts(cluster, "app")
        # After the target: changes that recovery must not replay.
        cluster.execute("DELETE FROM pgbench_history", "app")
        cluster.execute("UPDATE bench_docs SET doc = doc || '{\"late\": true}' WHERE id % 10 = 0", "app")
        current = str(cluster.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0])
        cluster.execute("SELECT pg_switch_wal()")
        _wait(lambda: current in archive.list_archive(storage).segments, 300, f"{current} archived")
        archiver.send_signal(signal.SIGTERM)
        archiver.wait(timeout=120)
        print(
            f"setup: target {target.isoformat()}; dump {dump.stat().st_size / 1e6:.0f} MB; archive up to"
            f" {current}",
            flush=True,
        )
        # Both sides start from a clean cluster: the setup's dirty buffers are written out first.
        cluster.execute("CHECKPOINT")
        yield Prepared(cluster, work, settings, target, dump, expected, results)
    finally:
        stop_process(archiver)
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    args = _parse(sys.argv[1:])
    with prepared(args.size_mb, args.wal_mb, args.dir) as ready:
        measure(ready, args.repeats)
    return 0


def measure(ready: Prepared, repeats: int) -> dict[str, object]:
    """Time both sides alternately, check they restored the same rows, print the phases and the ratio."""
    from tasks.wal.recover import restore_to_point

    cluster, results = ready.cluster, ready.results
    restored: list[PointRestoreResult] = []

    def raw_restore() -> harness.Sample:
        _drop(cluster, "raw_restore")
        cluster.execute("CREATE DATABASE raw_restore")
        return harness.run_process(
            ["pg_restore", "-j", "2", "--dbname", cluster.dsn("raw_restore"), str(ready.dump)]
        )

    def point_restore() -> harness.Sample:
        def run() -> None:
            result = restore_to_point(ready.settings, target_time=ready.target)
            if not result.comparison.matches:
                raise RuntimeError(result.comparison.summary())
            restored.append(result)
            if result.old_database:
                _drop(cluster, result.old_database)

        return harness.run_callable(run)

    load_before = os.getloadavg()[0]
    size_mb = int(results["database_bytes"]) // 1_000_000  # type: ignore[call-overload]

    def settle() -> None:
        # Each side starts from a quiet cluster: the other side's restored tables vacuumed and analyzed
        # (else autovacuum does it during the next measurement, which then pays for it) and its
        # writes on disk, not being written back under it.
        databases = cluster.execute("SELECT datname FROM pg_database WHERE datallowconn")
        for (database,) in databases:
            cluster.execute("VACUUM (ANALYZE)", str(database))
        cluster.execute("CHECKPOINT")
        os.sync()

    outcome = harness.compare(
        f"restore-to-point-vs-pg_restore-j2-{size_mb}mb",
        ("pg_restore -j 2 of pg_dump -Fc into a fresh database", raw_restore),
        ("restore_to_point (unpack, replay, copy, compare, swap)", point_restore),
        repeats=repeats,
        warmup=0,
        setup=settle,
    )
    results["compare"] = outcome
    same = _counts(cluster, "app") == ready.expected == _counts(cluster, "raw_restore")
    print(f"  both restored databases hold the rows of the target: {'yes' if same else 'NO'}")
    phases: dict[str, list[float]] = {}
    for result in restored:
        for name, seconds in result.phases.seconds.items():
            phases.setdefault(name, []).append(seconds)
    total = statistics.median(r.duration_seconds for r in restored)
    print("\n== where restore_to_point's time goes (median of its runs)")
    for name, values in [*phases.items(), ("other (sessions, lock, new database)", [])]:
        median = statistics.median(values) if values else total - sum(map(statistics.median, phases.values()))
        print(f"  {name:<40} {median:8.1f} s  {median / total * 100:5.1f}%")
    results["phases"] = {name: statistics.median(v) for name, v in phases.items()}
    results["rows_match"] = same
    print(
        f"\nratio restore to a point / logical restore: {outcome['time_ratio']}x (target <= 1.0x);"
        f" on a shared machine with {os.cpu_count()} cores, load average {load_before:.1f} before and"
        f" {os.getloadavg()[0]:.1f} after"
    )
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    (harness.RESULTS_DIR / "pitr-summary.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
