"""The parallel restore's paths on the real PostgreSQL: the catalog kept apart for pre- and post-data,
the drill's unlogged load (and when it must stay logged), and a catalog larger than the part kept."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from tasks import backup
from tasks.backup.database import _scratch_database
from tasks.backup.manifest import _storage
from tasks.backup.restore import pipeline as restore_pipeline
from tasks.backup.restore.streams import _DataSplit
from tests.fixtures.s3 import backup_settings, populate_backup_source, scratch_databases

pytestmark = pytest.mark.integration


def persistence(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname, c.relpersistence FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r'"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return {str(name): str(kind) for name, kind in rows}


def restore_copy(dsn: str, tmp_path: Path, *, unlogged_load: bool) -> tuple[dict[str, str], int, bool]:
    """Back up ``dsn``, restore it into a scratch database; return its tables' persistence, its
    foreign keys and whether it matches the manifest."""
    settings = backup_settings(
        dsn, f"file://{tmp_path}", backup={"restore_jobs": 2, "spool_dir": str(tmp_path)}
    )
    manifest = backup.create_backup(settings, verify="none")
    storage = _storage(settings)
    name = backup.scratch_name(manifest.database, "paths")
    with _scratch_database(settings, name, owner=None):
        backup.restore_into(settings, storage, manifest, name, unlogged_load=unlogged_load)
        copy_dsn = dsn.rpartition("/")[0] + "/" + name
        kinds = persistence(copy_dsn)
        with psycopg.connect(copy_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'").fetchone()
        comparison = backup.compare_database_to_manifest(settings, manifest, name)
    assert not list(tmp_path.glob("*.catalog")), "the catalog file is removed"
    return kinds, int(row[0]) if row else 0, comparison.matches


def add_foreign_key(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, item int NOT NULL REFERENCES items (id))")
        conn.execute("INSERT INTO orders SELECT g, g FROM generate_series(1, 40) g")


def test_the_drill_copy_loads_unlogged_and_still_matches(
    pg_database: tuple[str, str], tmp_path: Path
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=200)
    add_foreign_key(dsn)
    kinds, foreign_keys, matches = restore_copy(dsn, tmp_path, unlogged_load=True)
    assert set(kinds.values()) == {"u"}
    assert len(kinds) == 4
    assert foreign_keys == 1
    assert matches
    # A real restore keeps the tables as they were.
    kinds, _, matches = restore_copy(dsn, tmp_path, unlogged_load=False)
    assert set(kinds.values()) == {"p"}
    assert matches


@pytest.mark.parametrize("feature", ["publication", "partitioned"])
def test_tables_stay_logged_where_unlogged_ones_would_break_the_restore(
    pg_database: tuple[str, str], tmp_path: Path, feature: str
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=50)
    add_foreign_key(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if feature == "publication":
            conn.execute("CREATE PUBLICATION items_feed FOR TABLE items")
        else:
            # A partitioned parent stays permanent, and it references a plain table.
            conn.execute(
                "CREATE TABLE events (id int, item int REFERENCES items (id), at date)"
                " PARTITION BY RANGE (at)"
            )
            conn.execute(
                "CREATE TABLE events_2026 PARTITION OF events"
                " FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
            )
            conn.execute("INSERT INTO events VALUES (1, 1, '2026-03-01'), (2, 2, '2026-04-01')")
    kinds, _, matches = restore_copy(dsn, tmp_path, unlogged_load=True)
    assert set(kinds.values()) == {"p"}
    assert matches


def test_a_catalog_larger_than_the_part_kept_is_read_again(
    pg_database: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=300)
    add_foreign_key(dsn)
    # Keep less than the catalog: pre-data, data and post-data must come from readings of the object.
    monkeypatch.setattr(restore_pipeline, "_CATALOG_LIMIT", 512)
    kinds, foreign_keys, matches = restore_copy(dsn, tmp_path, unlogged_load=True)
    assert foreign_keys == 1
    assert matches
    assert set(kinds.values()) == {"p"}  # the unlogged load needs the catalog before the data


def test_the_data_splits_at_the_largest_table_in_archive_order(tmp_path: Path) -> None:
    listing = "\n".join(
        [
            ";",
            "; Archive created at 2026-11-29",
            "201; 1259 16390 TABLE public a_small postgres",
            "3366; 0 17335 TABLE DATA public a_small postgres",
            "3364; 0 17319 TABLE DATA public big postgres",
            "3365; 0 17322 TABLE DATA public c_after postgres",
            "3370; 0 0 SEQUENCE SET public big_id_seq postgres",
        ]
    )
    manifest = backup.BackupManifest.model_validate(
        {
            "id": "x",
            "database": "d",
            "started_at": "2026-11-29T00:00:00Z",
            "finished_at": "2026-11-29T00:00:00Z",
            "size_bytes": 1,
            "sha256": "0",
            "pg_dump_version": "15",
            "server_version": "15",
            "tables": {
                "public.a_small": {"rows": 10, "bytes": 8192},
                "public.big": {"rows": 5, "bytes": 10**9},
                "public.c_after": {"rows": 1000, "bytes": 16384},
            },
        }
    )
    split = _DataSplit.of(manifest, listing, tmp_path / "x.catalog")
    assert split is not None
    # The second stream takes the largest table's data and the data after it; the first stops early.
    assert split.rest.read_text().splitlines() == [
        "3364; 0 17319 TABLE DATA public big postgres",
        "3365; 0 17322 TABLE DATA public c_after postgres",
    ]
    assert split.first.read_text().splitlines() == [
        "201; 1259 16390 TABLE public a_small postgres",
        "3366; 0 17335 TABLE DATA public a_small postgres",
        "3370; 0 0 SEQUENCE SET public big_id_seq postgres",
    ]
    # The largest first in the archive: it alone goes apart.
    manifest.tables["public.a_small"].bytes = 10**10
    split = _DataSplit.of(manifest, listing, tmp_path / "y.catalog")
    assert split is not None
    assert split.rest.read_text().splitlines() == ["3366; 0 17335 TABLE DATA public a_small postgres"]
    # One table with data, or an empty largest table: nothing to split.
    only_one = "\n".join(line for line in listing.splitlines() if "big" not in line and "c_after" not in line)
    assert _DataSplit.of(manifest, only_one, tmp_path / "z") is None
    manifest.tables["public.a_small"].rows = 0
    assert _DataSplit.of(manifest, listing, tmp_path / "z") is None


@pytest.mark.parametrize(
    "victim", ["public.items", "public.aaa_early"], ids=["largest-stream", "first-stream"]
)
def test_a_failure_in_either_data_stream_fails_the_drill_and_leaves_nothing_behind(
    pg_database: tuple[str, str], tmp_path: Path, victim: str
) -> None:
    name, dsn = pg_database
    populate_backup_source(dsn, rows=120_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Before the largest table in the archive: loaded by the first stream.
        conn.execute(
            "CREATE TABLE aaa_early AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 60000) g"
        )
    spool = str(tmp_path / "spool")
    settings = backup_settings(dsn, f"file://{tmp_path}", backup={"restore_jobs": 2, "spool_dir": spool})
    manifest = backup.create_backup(settings, verify="none")
    assert max(manifest.tables, key=lambda t: manifest.tables[t].bytes or 0) == "public.items"
    admin = dsn.rpartition("/")[0] + "/postgres"
    killed: list[int] = []
    stop = threading.Event()

    def terminate_the_copy() -> None:
        table = victim.split(".")[1]
        with psycopg.connect(admin, autocommit=True) as conn:
            while not stop.is_set() and not killed:
                row = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname LIKE %s AND query LIKE %s",
                    (f"{name}__drill%", f"COPY public.{table} %"),
                ).fetchone()
                if row:
                    conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    killed.append(int(row[0]))
                time.sleep(0.005)

    watcher = threading.Thread(target=terminate_the_copy)
    watcher.start()
    started = time.monotonic()
    try:
        result = backup.verify_backup(settings, manifest.id, "restore")
    finally:
        stop.set()
        watcher.join()
    assert killed, "the COPY was never seen"
    assert not result.ok
    assert "does not restore" in result.detail
    assert time.monotonic() - started < 120
    assert scratch_databases(f"{name}__") == []
    with psycopg.connect(admin, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'swagger2mcp-ops-pg_restore'"
        ).fetchone()
    assert left == (0,)
    assert list((tmp_path / "spool").iterdir()) == []  # no catalog or list file left
