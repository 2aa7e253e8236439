"""Backups against the real PostgreSQL with the local-directory backend: dump, drill, restore, faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tasks import backup
from tasks.backup import BackupCorrupt, BackupNotFound, DatabaseNotFound, RestoreFailed
from tasks.backup.manifest import _storage
from tasks.errors import LockBusy
from tasks.postgres import advisory_lock
from tests.fixtures.s3 import backup_settings, drop_databases, populate_backup_source, scratch_databases

pytestmark = pytest.mark.integration


@pytest.fixture
def source(pg_database: tuple[str, str]) -> tuple[str, str]:
    name, dsn = pg_database
    populate_backup_source(dsn)
    return name, dsn


def _rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def _data_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "data").glob("*")) if (root / "data").is_dir() else []


@pytest.mark.parametrize("jobs", [1, 2], ids=["one-job", "parallel-post-data"])
def test_backup_and_restore_drill_match_the_manifest(
    source: tuple[str, str], tmp_path: Path, jobs: int
) -> None:
    name, dsn = source
    settings = backup_settings(dsn, f"file://{tmp_path}", backup={"restore_jobs": jobs})
    manifest = backup.create_backup(settings, verify="restore")

    assert manifest.database == name
    assert manifest.tables["public.items"].rows == 500
    assert manifest.tables["Other Schema.Mixed Case"].rows == 3
    assert manifest.tables["public.empty_table"].rows == 0
    assert all(t.content_hash is not None for t in manifest.tables.values())
    assert [(v.level, v.ok) for v in manifest.verifications] == [("restore", True)]
    assert "500" in manifest.verifications[0].detail or "503 rows" in manifest.verifications[0].detail
    stored = tmp_path / manifest.data_key
    assert stored.stat().st_size == manifest.size_bytes
    assert manifest.size_bytes < manifest.raw_size_bytes  # compressed
    # No scratch database is left behind.
    assert scratch_databases(f"{name}__") == []
    assert [m.id for m in backup.list_backups(settings)] == [manifest.id]
    latest = backup.latest_verified(settings, name, "restore")
    assert latest is not None
    assert latest.id == manifest.id


@pytest.mark.parametrize("jobs", [1, 2], ids=["one-job", "parallel-post-data"])
def test_restore_drill_reports_a_table_whose_content_or_count_differs(
    source: tuple[str, str], tmp_path: Path, jobs: int
) -> None:
    # The drill reads tables while they load and while indexes build (jobs 2): a difference in any
    # table must still be found, and a table checked before the post-data section counts too.
    _name, dsn = source
    settings = backup_settings(dsn, f"file://{tmp_path}", backup={"restore_jobs": jobs})
    manifest = backup.create_backup(settings, verify="none")
    names = sorted(manifest.tables)
    assert len(names) >= 2
    first, last = names[0], names[-1]
    assert manifest.tables[first].content_hash is not None
    manifest.tables[first].content_hash = str(int(manifest.tables[first].content_hash) + 1)
    manifest.tables[last].rows += 1
    backup.write_manifest(_storage(settings), manifest)
    result = backup.verify_backup(settings, manifest.id, "restore")
    assert not result.ok
    assert first in result.detail, result.detail
    assert last in result.detail, result.detail


def test_counts_come_from_the_dump_snapshot_under_concurrent_writes(
    source: tuple[str, str], tmp_path: Path
) -> None:
    _name, dsn = source
    settings = backup_settings(dsn, f"file://{tmp_path}", backup={"restore_jobs": 1})
    stop = threading.Event()
    inserted = 0

    def writer() -> None:
        nonlocal inserted
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO items (id, name) VALUES (%s, 'concurrent')", (100_000 + inserted,))
                inserted += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        manifest = backup.create_backup(settings, verify="none")
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    total = _rows(dsn, "SELECT count(*) FROM items")[0][0]
    assert manifest.tables["public.items"].rows < total  # rows kept coming after the snapshot
    result = backup.verify_backup(settings, manifest.id, "restore")
    assert result.ok, result.detail


def test_corrupted_or_truncated_object_is_refused_before_any_restore(
    source: tuple[str, str], tmp_path: Path
) -> None:
    name, dsn = source
    settings = backup_settings(dsn, f"file://{tmp_path}")
    manifest = backup.create_backup(settings, verify="none")
    stored = tmp_path / manifest.data_key
    original = stored.read_bytes()

    # One flipped byte in the middle: same size, other digest.
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    stored.write_bytes(bytes(flipped))
    _rows(dsn, "DELETE FROM items WHERE id <= 10")
    with pytest.raises(BackupCorrupt, match="sha256"):
        backup.restore_backup(settings, manifest.id)
    assert scratch_databases(f"{name}__") == []
    assert _rows(dsn, "SELECT count(*) FROM items")[0][0] == 490  # untouched

    stored.write_bytes(original[: len(original) // 2])
    with pytest.raises(BackupCorrupt, match="truncated"):
        backup.restore_backup(settings, manifest.id)
    check = backup.verify_backup(settings, manifest.id, "checksum")
    assert not check.ok
    assert "truncated" in check.detail
    assert backup.latest_verified(settings, name, "checksum") is None
    assert scratch_databases(f"{name}__") == []


@pytest.mark.usefixtures("restore_leftovers")
def test_restore_swaps_atomically_and_cuts_sessions(source: tuple[str, str], tmp_path: Path) -> None:
    name, dsn = source
    settings = backup_settings(dsn, f"file://{tmp_path}")
    manifest = backup.create_backup(settings, verify="catalog")
    _rows(dsn, "DELETE FROM items WHERE id > 100; CREATE TABLE added_later (x int)")
    holder = psycopg.connect(dsn, autocommit=True)
    try:
        plan = backup.restore_preflight(settings, manifest, keep_old=True)
        assert plan.target_exists
        assert any(c.pid == holder.info.backend_pid for c in plan.connections)

        result = backup.restore_backup(settings, manifest.id, keep_old=True)

        assert result.comparison.matches
        assert result.comparison.rows_compared == manifest.total_rows
        assert result.terminated_connections >= 1
        with pytest.raises(psycopg.OperationalError):
            holder.execute("SELECT 1")
    finally:
        holder.close()
    assert _rows(dsn, "SELECT count(*) FROM items")[0][0] == 500
    assert _rows(dsn, "SELECT to_regclass('added_later') IS NULL")[0][0] is True
    # Indexes and constraints (the parallel post-data step) are back too.
    assert _rows(dsn, "SELECT conname FROM pg_constraint WHERE conrelid = 'items'::regclass") == [
        ("items_pkey",)
    ]
    assert result.old_database is not None
    assert result.old_kept
    leftovers = scratch_databases(f"{name}__")
    assert leftovers == [result.old_database]
    drop_databases(leftovers)

    # keep_old=False drops the replaced database; running it again gives the same data.
    again = backup.restore_backup(settings, manifest.id)
    assert again.comparison.matches
    assert not again.old_kept
    assert scratch_databases(f"{name}__") == []


def test_restore_that_fails_verification_leaves_the_target(source: tuple[str, str], tmp_path: Path) -> None:
    name, dsn = source
    settings = backup_settings(dsn, f"file://{tmp_path}")
    manifest = backup.create_backup(settings, verify="none")
    # A manifest claiming other counts than the dump holds: the restored copy cannot match it.
    storage_manifest = manifest.model_copy(deep=True)
    storage_manifest.tables["public.items"].rows += 1
    backup.write_manifest(_storage(settings), storage_manifest)
    _rows(dsn, "DELETE FROM items WHERE id > 400")
    with pytest.raises(RestoreFailed, match="was not touched"):
        backup.restore_backup(settings, manifest.id)
    assert _rows(dsn, "SELECT count(*) FROM items")[0][0] == 400
    assert scratch_databases(f"{name}__") == []


def test_unknown_backup_or_database_fails_clearly_and_touches_nothing(
    source: tuple[str, str], tmp_path: Path
) -> None:
    name, dsn = source
    settings = backup_settings(dsn, f"file://{tmp_path}")
    with pytest.raises(DatabaseNotFound, match="ops_bk_no_such_db"):
        backup.create_backup(settings, database="ops_bk_no_such_db")
    assert not (tmp_path / "data").exists()
    with pytest.raises(BackupNotFound, match="no finished backup"):
        backup.resolve_backup_id(settings, "latest")
    manifest = backup.create_backup(settings, verify="none")
    with pytest.raises(BackupNotFound, match="no backup '20200101T000000Z-nope-000000'"):
        backup.restore_backup(settings, "20200101T000000Z-nope-000000")
    with pytest.raises(BackupNotFound, match="not a backup id"):
        backup.verify_backup(settings, "../../etc/passwd", "checksum")
    with pytest.raises(backup.BackupNotVerified, match="restore verification"):
        backup.resolve_backup_id(settings, "latest-verified")
    with pytest.raises(DatabaseNotFound, match="ops_bk_missing_target"):
        backup.restore_backup(settings, manifest.id, target_database="ops_bk_missing_target")
    assert scratch_databases("ops_bk_missing_target") == []
    assert scratch_databases(f"{name}__") == []
    assert backup.read_manifest(_storage(settings), manifest.id).verifications == []


def test_wrong_database_credentials_fail_clearly_with_the_secret_masked(tmp_path: Path) -> None:
    settings = backup_settings(
        "postgresql://ops_bk_no_such_role:Sup3rS3cretPw@127.0.0.1:5432/postgres", f"file://{tmp_path}"
    )
    with pytest.raises(backup.BackupError) as caught:
        backup.create_backup(settings)
    message = str(caught.value)
    assert "ops_bk_no_such_role" in message
    assert "OPS_POSTGRES__DSN" in message
    assert "Sup3rS3cretPw" not in message
    assert not (tmp_path / "data").exists()


_KILL_CHILD = """
import sys
from tasks import backup
from tests.fixtures.s3 import backup_settings
settings = backup_settings(sys.argv[1], sys.argv[2], backup={"zstd_level": 22})
backup.create_backup(settings, verify="none")
"""


def test_killed_mid_dump_leaves_no_manifest_and_the_next_run_succeeds(
    pg_database: tuple[str, str], tmp_path: Path
) -> None:
    _name, dsn = pg_database
    # Enough data that zstd level 22 takes seconds: the kill lands mid-dump.
    _rows(
        dsn,
        "CREATE TABLE bulk AS SELECT g AS id, md5(g::text) || md5((g * 3)::text) AS v"
        " FROM generate_series(1, 300000) g",
    )
    url = f"file://{tmp_path}"
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, dsn, url], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}
    )
    try:
        deadline = time.monotonic() + 60
        partial = None
        while time.monotonic() < deadline and child.poll() is None:
            found = list((tmp_path / "data").glob("*.partial")) if (tmp_path / "data").is_dir() else []
            if found and found[0].stat().st_size > 0:
                partial = found[0]
                break
            time.sleep(0.02)
        assert partial is not None, "the dump never started writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "manifests").exists()
    settings = backup_settings(dsn, url, backup={"orphan_grace_hours": 0.0001})
    assert backup.list_backups(settings) == []

    manifest = backup.create_backup(settings, verify="catalog")
    assert [m.id for m in backup.list_backups(settings)] == [manifest.id]
    assert manifest.verifications[-1].ok

    # The interrupted object is found by the retention plan and removed only when confirmed.
    time.sleep(0.5)
    plan = backup.retention_plan(settings)
    assert [u.key for u in plan.unfinished] == [f"data/{partial.name.removesuffix('.partial')}"]
    dry = backup.delete_backups(settings, plan, confirm=False)
    assert dry.dry_run
    assert partial.exists()
    done = backup.delete_backups(settings, plan, confirm=True)
    assert done.discarded_unfinished == [plan.unfinished[0].key]
    assert not partial.exists()
    assert _data_files(tmp_path) == [f"{manifest.id}.dump.zst"]


def test_restore_waits_for_the_database_lock(source: tuple[str, str], tmp_path: Path) -> None:
    name, dsn = source
    settings = backup_settings(dsn, f"file://{tmp_path}", backup={"lock_timeout_seconds": 0.5})
    manifest = backup.create_backup(settings, verify="none")
    admin = dsn.rpartition("/")[0] + "/postgres"
    with (
        psycopg.connect(admin, autocommit=True, application_name="other-ops-run") as conn,
        advisory_lock(conn, f"swagger2mcp-ops:database:{name}", 1),
        pytest.raises(LockBusy, match="other-ops-run"),
    ):
        backup.restore_backup(settings, manifest.id)
    assert scratch_databases(f"{name}__") == []


def test_a_migration_and_a_restore_of_one_database_exclude_each_other(
    source: tuple[str, str], tmp_path: Path
) -> None:
    from tasks import migrate

    name, dsn = source
    settings = backup_settings(
        dsn,
        f"file://{tmp_path}",
        backup={"lock_timeout_seconds": 0.5},
        migrations={"lock_timeout_seconds": 0.5},
    )
    manifest = backup.create_backup(settings, verify="none")
    with migrate.migration_lock(settings, owner="migrate-database run-m"):
        # A manual restore waits for the migration, and names it.
        with pytest.raises(LockBusy, match="run-m"):
            backup.restore_backup(settings, manifest.id)
        # The migration's own restore (on its failure) goes on under the lock its run holds.
        result = backup.restore_backup(settings, manifest.id, database_lock_held=True, keep_old=False)
        assert result.comparison.matches
    admin = dsn.rpartition("/")[0] + "/postgres"
    with (
        psycopg.connect(admin, autocommit=True, application_name="restore-database run-r") as conn,
        advisory_lock(conn, backup.database_lock_name(name), 1),
        pytest.raises(LockBusy, match="run-r"),
        migrate.migration_lock(settings, owner="migrate-database run-late"),
    ):
        pass
    assert scratch_databases(f"{name}__") == []


def test_restore_keeps_the_databases_settings_privileges_and_comment(
    source: tuple[str, str], tmp_path: Path
) -> None:
    # None of these is in a dump made without --create: the swap carries them over from the old one.
    name, dsn = source
    role = f"{name}_reader"
    admin = dsn.rpartition("/")[0] + "/postgres"
    settings = backup_settings(dsn, f"file://{tmp_path}")
    manifest = backup.create_backup(settings, verify="none")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}"')
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"""ALTER DATABASE "{name}" SET search_path = app, "Other Schema", public""")
            conn.execute(f"ALTER DATABASE \"{name}\" SET statement_timeout = '12s'")
            conn.execute(f'ALTER ROLE "{role}" IN DATABASE "{name}" SET work_mem = \'8MB\'')
            conn.execute(f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC')
            conn.execute(f'GRANT CONNECT ON DATABASE "{name}" TO "{role}"')
            conn.execute(f'ALTER DATABASE "{name}" CONNECTION LIMIT 40')
            conn.execute(f"COMMENT ON DATABASE \"{name}\" IS 'the app''s data'")

        def properties() -> tuple[object, ...]:
            with psycopg.connect(admin, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT d.datacl::text[], d.datconnlimit, shobj_description(d.oid, 'pg_database'),"
                    " (SELECT array_agg(coalesce(r.rolname, '') || ':' || array_to_string(s.setconfig, ';')"
                    "   ORDER BY r.rolname NULLS FIRST) FROM pg_db_role_setting s"
                    "   LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE s.setdatabase = d.oid)"
                    " FROM pg_database d WHERE d.datname = %s",
                    (name,),
                ).fetchone()
            assert row is not None
            return tuple(row)

        before = properties()
        assert before[1] == 40
        backup.restore_backup(settings, manifest.id, keep_old=False)
        assert properties() == before
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SHOW search_path").fetchone() == ('app, "Other Schema", public',)
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (500,)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')
