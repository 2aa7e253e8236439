"""Backup benchmark: the project's dump+store+checksum step vs ``pg_dump -Fc``, and the restore drill vs
``pg_restore -j 2``, on a database of more than 1 GB (pgbench scale 100 plus a JSONB table).

    python -m bench.bench_backup            # set up (or reuse) ops_bench_backup, measure, print ratios
    python -m bench.bench_backup --drop     # ... and drop the benchmark databases afterwards

Setup creates ``ops_bench_backup`` with ``pgbench -i -s 100`` (about 45-60 s on 2 cores) and a JSONB
table ``bench_docs`` (about 20-30 s); a database that already has both is reused. Peak memory is
measured as the database grows: the same backup step on ``ops_bench_backup_small`` (scale 10) and on the
full database. Environment: ``BENCH_PG_ADMIN_DSN`` (default postgresql://postgres@127.0.0.1:5432/postgres),
``BENCH_DIR`` (dumps and the file:// storage; default a temporary directory, removed at the end),
``BENCH_REPEATS`` (default 3); ``BENCH_PARTS`` (default ``backup,restore,memory``);
``BENCH_DATABASE`` and ``BENCH_SCALE`` for a quick trial run, e.g. to iterate on the restore drill::

    BENCH_SCALE=20 BENCH_DATABASE=ops_bench_backup_q BENCH_PARTS=restore python -m bench.bench_backup --drop
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from bench import harness

if TYPE_CHECKING:
    from tasks.settings import OpsSettings

ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE = os.environ.get("BENCH_DATABASE", "ops_bench_backup")
SMALL_DATABASE = DATABASE + "_small"
RESTORE_TARGET = DATABASE + "_raw_restore"
SCALE = int(os.environ.get("BENCH_SCALE", "100"))
DOCS_ROWS = 4_000 * SCALE
ROOT = Path(__file__).resolve().parent.parent


def _dsn(database: str) -> str:
    return ADMIN_DSN.rpartition("/")[0] + "/" + database


def _admin(sql: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql)


def _exists(database: str) -> bool:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is not None
        )


def _drop(database: str) -> None:
    _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def setup_database(database: str, scale: int, docs_rows: int) -> float:
    """Create (or reuse) a pgbench database with a JSONB table; returns the seconds setup took."""
    started = time.perf_counter()
    if not _exists(database):
        _admin(f'CREATE DATABASE "{database}"')
    with psycopg.connect(_dsn(database), autocommit=True) as conn:
        has_accounts = conn.execute("SELECT to_regclass('public.pgbench_accounts') IS NOT NULL").fetchone()
        rows = 0
        if has_accounts and has_accounts[0]:
            counted = conn.execute("SELECT count(*) FROM pgbench_branches").fetchone()
            rows = int(counted[0]) if counted else 0
    if rows != scale:
        print(f"setup: pgbench -i -s {scale} {database} ...", flush=True)
        subprocess.run(
            ["pgbench", "-i", "-s", str(scale), "-q", _dsn(database)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    with psycopg.connect(_dsn(database), autocommit=True) as conn:
        ready = conn.execute("SELECT to_regclass('public.bench_docs') IS NOT NULL").fetchone()
        if not (ready and ready[0]):
            print(f"setup: JSONB table bench_docs ({docs_rows} rows) ...", flush=True)
            conn.execute("SET statement_timeout = 0")
            conn.execute(
                "CREATE TABLE bench_docs"
                " (id bigint PRIMARY KEY, created timestamptz NOT NULL, doc jsonb NOT NULL)"
            )
            conn.execute(
                "INSERT INTO bench_docs SELECT g, now() - g * interval '1 second',"
                " jsonb_build_object('id', g, 'name', 'user-' || g, 'email', 'user' || g || '@example.com',"
                "  'tags', jsonb_build_array('a' || (g % 17), 'b' || (g % 31), 'c' || (g % 7)),"
                "  'address', jsonb_build_object('street', md5(g::text),"
                "   'zip', lpad((g % 99999)::text, 5, '0')),"
                "  'score', (g % 1000) / 7.0, 'active', g % 3 = 0, 'payload', repeat(md5((g * 7)::text), 4))"
                f" FROM generate_series(1, {docs_rows}) g"
            )
            conn.execute("VACUUM ANALYZE bench_docs")
    return time.perf_counter() - started


def _database_size(database: str) -> int:
    with psycopg.connect(_dsn(database), autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def _project_env(storage_dir: Path, database: str) -> dict[str, str]:
    return {
        "OPS_POSTGRES__DSN": _dsn(database),
        "OPS_POSTGRES__STATEMENT_TIMEOUT_SECONDS": "3600",
        "OPS_STORAGE__URL": f"file://{storage_dir}",
        "OPS_BACKUP__SPOOL_DIR": str(storage_dir.parent / "spool"),
        "PYTHONPATH": str(ROOT),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def _child_backup() -> None:
    """In a fresh process: the project's dump+store+checksum step; prints the manifest as JSON."""
    from tasks.backup import create_backup
    from tasks.settings import load_settings

    settings = load_settings()
    manifest = create_backup(settings, verify="none", content_hashes=settings.backup.content_hashes)
    print(
        json.dumps({"id": manifest.id, "size": manifest.size_bytes, "raw": manifest.raw_size_bytes}),
        file=sys.stderr,
    )


def _project_settings(env: dict[str, str]) -> OpsSettings:
    from tasks.settings import load_settings

    os.environ.update(env)
    return load_settings()


def _child_drill(backup_id: str) -> None:
    """In a fresh process: the restore drill (scratch database, compare with the manifest, drop)."""
    from tasks.backup import verify_backup
    from tasks.settings import load_settings

    result = verify_backup(load_settings(), backup_id, "restore")
    if not result.ok:
        raise SystemExit(f"restore drill failed: {result.detail}")


def _run_child(args: list[str], env: dict[str, str]) -> harness.Sample:
    return harness.run_process([sys.executable, "-m", "bench.bench_backup", *args], env=env, cwd=str(ROOT))


def _latest_backup(storage_dir: Path) -> tuple[str, int]:
    manifests = sorted((storage_dir / "manifests").glob("*.json"), key=lambda p: p.stat().st_mtime)
    data = json.loads(manifests[-1].read_text())
    return data["id"], int(data["size_bytes"])


def main() -> int:
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    work = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="ops-bench-backup-"))
    work.mkdir(parents=True, exist_ok=True)
    storage_dir = work / "store"
    (work / "spool").mkdir(exist_ok=True)
    raw_file = work / "raw.dump"
    drop = "--drop" in sys.argv
    parts = set(os.environ.get("BENCH_PARTS", "backup,restore,memory").split(","))
    results: dict[str, object] = {}
    try:
        seconds = setup_database(DATABASE, SCALE, DOCS_ROWS)
        size = _database_size(DATABASE)
        print(f"setup of {DATABASE}: {seconds:.1f} s; database size {size / 1e9:.2f} GB", flush=True)
        results["setup_seconds"] = round(seconds, 1)
        results["database_bytes"] = size
        env = _project_env(storage_dir, DATABASE)

        def raw_dump() -> harness.Sample:
            sample = harness.run_process(["pg_dump", "-Fc", "-f", str(raw_file), "--dbname", _dsn(DATABASE)])
            sample.size_bytes = raw_file.stat().st_size
            return sample

        # Timed in this process (a flow run's process has its imports loaded already); peak memory is
        # measured in fresh processes below.
        settings = _project_settings(env)

        def project_dump() -> harness.Sample:
            from tasks.backup import create_backup

            return harness.run_callable(
                lambda: create_backup(settings, verify="none", content_hashes=True).size_bytes
            )

        if "backup" in parts:
            results["backup"] = harness.compare(
                "backup-vs-pg_dump-Fc",
                ("pg_dump -Fc (default compression) to a file", raw_dump),
                ("create_backup (zstd, sha256, counts+hashes)", project_dump),
                repeats=repeats,
                warmup=0,
            )

        def fresh_target() -> None:
            _drop(RESTORE_TARGET)
            _admin(f'CREATE DATABASE "{RESTORE_TARGET}"')

        def raw_restore() -> harness.Sample:
            fresh_target()
            return harness.run_process(
                ["pg_restore", "-j", "2", "--dbname", _dsn(RESTORE_TARGET), str(raw_file)]
            )

        def drill_of(backup_id: str) -> Callable[[], harness.Sample]:
            def project_drill() -> harness.Sample:
                from tasks.backup import verify_backup

                _drop(RESTORE_TARGET)

                def drill() -> None:
                    result = verify_backup(settings, backup_id, "restore")
                    if not result.ok:
                        raise RuntimeError(f"restore drill failed: {result.detail}")

                return harness.run_callable(drill)

            return project_drill

        if "restore" in parts:
            from tasks.backup import create_backup

            if not raw_file.exists():
                raw_dump()
            hashed = create_backup(settings, verify="none", content_hashes=True)
            counted = create_backup(settings, verify="none", content_hashes=False)
            results["restore"] = harness.compare(
                "restore-drill-vs-pg_restore-j2",
                ("pg_restore -j 2 into a fresh database", raw_restore),
                ("restore drill (restore + counts + hashes + drop)", drill_of(hashed.id)),
                repeats=repeats,
                warmup=0,
            )
            results["restore_counts_only"] = harness.compare(
                "restore-drill-counts-only-vs-pg_restore-j2",
                ("pg_restore -j 2 into a fresh database", raw_restore),
                ("restore drill (restore + counts + drop)", drill_of(counted.id)),
                repeats=repeats,
                warmup=0,
            )
            _drop(RESTORE_TARGET)

        if "memory" in parts:
            # Peak memory as the database grows: the same step on a tenth of the data.
            small_seconds = setup_database(SMALL_DATABASE, max(1, SCALE // 10), DOCS_ROWS // 10)
            small = _run_child(["_backup"], _project_env(work / "store-small", SMALL_DATABASE))
            big = _run_child(["_backup"], env)
            memory = {
                "small_database_bytes": _database_size(SMALL_DATABASE),
                "small_setup_seconds": round(small_seconds, 1),
                "small_peak_rss_mb": round(small.peak_rss_mb or 0, 1),
                "large_database_bytes": size,
                "large_peak_rss_mb": round(big.peak_rss_mb or 0, 1),
            }
            results["memory"] = memory
            print(
                f"\n== peak RSS of the backup step (fresh process): {memory['small_peak_rss_mb']} MB at"
                f" {memory['small_database_bytes'] / 1e9:.2f} GB, {memory['large_peak_rss_mb']} MB at"
                f" {size / 1e9:.2f} GB"
            )
        summary = [
            f"{name}: time {result['time_ratio']}x"
            + (f", size {result['size_ratio']}x" if "size_ratio" in result else "")
            for name, result in results.items()
            if isinstance(result, dict) and "time_ratio" in result
        ]
        print("\nratios (targets: backup <= 0.85x wall, <= 0.65x size; restore drill <= 1.15x):")
        for line in summary:
            print("  " + line)
        harness.RESULTS_DIR.mkdir(exist_ok=True)
        (harness.RESULTS_DIR / "backup-summary.json").write_text(json.dumps(results, indent=2, default=str))
    finally:
        _drop(RESTORE_TARGET)
        if drop:
            _drop(DATABASE)
            _drop(SMALL_DATABASE)
        if not os.environ.get("BENCH_DIR"):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_backup":
        _child_backup()
        # harness.run_process reads the last stderr line of its wrapper, not ours.
        raise SystemExit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "_drill":
        _child_drill(sys.argv[2])
        raise SystemExit(0)
    raise SystemExit(main())
