"""Content hashes on the real PostgreSQL: what the typed-columns hash tells apart, and that manifests
made with the older row-text hash still verify."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tasks import backup
from tasks.backup.manifest import _storage
from tasks.backup.stats import _STATS_SESSION, _one_table_stats
from tests.fixtures.s3 import backup_settings, populate_backup_source, scratch_databases

pytestmark = pytest.mark.integration


def table_hash(dsn: str, table: str, algorithm: str = backup.HASH_TYPED_COLUMNS) -> tuple[int, str | None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_STATS_SESSION)
        stats = _one_table_stats(conn, "public", table, algorithm=algorithm)
    return stats.rows, stats.content_hash


def make(dsn: str, table: str, columns: str, rows: str) -> str | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} ({columns})")
        if rows:
            conn.execute(f"INSERT INTO {table} VALUES {rows}")
    return table_hash(dsn, table)[1]


def test_typed_hash_tells_apart_what_the_text_of_the_rows_tells_apart(pg_database: tuple[str, str]) -> None:
    _name, dsn = pg_database
    cols = "a int, b text, c numeric, d timestamptz, e char(4), f jsonb, g uuid, h bool"
    uuid = "00000000-0000-0000-0000-000000000001"
    first = f"(1, 'x', 1.0, '2026-01-01 00:00+00', 'ab', '{{\"k\": 1}}', '{uuid}', true)"
    second = "(2, 'y', 2.5, '2026-01-02 00:00+00', 'cd', '[1, 2]', NULL, false)"
    base = f"{first}, {second}"
    reference = make(dsn, "t", cols, base)
    # The same rows in another order, and in another session time zone: the same hash.
    assert make(dsn, "t", cols, f"{second}, {first}") == reference
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        conn.execute(_STATS_SESSION)
        assert _one_table_stats(conn, "public", "t", algorithm=backup.HASH_TYPED_COLUMNS) == (
            backup.TableStats(rows=2, content_hash=reference)
        )
    # Values that compare equal but print differently, values swapped between rows or columns, NULL
    # for a value: all differ.
    changed = {
        "numeric scale": base.replace("1.0,", "1.00,"),
        "jsonb number": base.replace('{"k": 1}', '{"k": 1.0}'),
        "swapped between rows": base.replace("'x'", "'tmp'").replace("'y'", "'x'").replace("'tmp'", "'y'"),
        "null for a value": base.replace("'ab'", "NULL"),
        "instant": base.replace("2026-01-01 00:00+00", "2026-01-01 00:00+01"),
    }
    seen = {reference}
    for why, rows in changed.items():
        got = make(dsn, "t", cols, rows)
        assert got not in seen, why
        seen.add(got)
    # Two columns of one type exchanging their values: the position seeds the hash.
    assert make(dsn, "u", "a int, b int", "(1, 2)") != make(dsn, "u", "a int, b int", "(2, 1)")


def test_a_dropped_column_in_the_source_does_not_change_the_hash(pg_database: tuple[str, str]) -> None:
    _name, dsn = pg_database
    fresh = make(dsn, "t", "a int, b text", "(1, 'x'), (2, 'y')")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE t")
        conn.execute("CREATE TABLE t (gone int, a int, b text)")
        conn.execute("INSERT INTO t VALUES (9, 1, 'x'), (9, 2, 'y')")
        conn.execute("ALTER TABLE t DROP COLUMN gone")
    assert table_hash(dsn, "t")[1] == fresh


def test_nondeterministic_collation_does_not_hide_a_change(pg_database: tuple[str, str]) -> None:
    _name, dsn = pg_database
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
        )
    cols = "a text COLLATE ci"
    assert make(dsn, "t", cols, "('Upload')") != make(dsn, "t", cols, "('upload')")


def test_a_manifest_with_row_text_hashes_still_verifies(pg_database: tuple[str, str], tmp_path: Path) -> None:
    name, dsn = pg_database
    populate_backup_source(dsn, rows=50)
    settings = backup_settings(dsn, f"file://{tmp_path}")
    manifest = backup.create_backup(settings, verify="none")
    assert manifest.content_hash_algorithm == backup.HASH_TYPED_COLUMNS
    # The same backup as an older version recorded it: row-text hashes, named by that algorithm.
    with psycopg.connect(dsn, autocommit=True) as conn:
        old = backup.table_stats(conn, algorithm=backup.HASH_ROW_TEXT)
    assert old.keys() == manifest.tables.keys()
    assert old != manifest.tables
    manifest.tables, manifest.content_hash_algorithm = old, backup.HASH_ROW_TEXT
    storage = _storage(settings)
    backup.write_manifest(storage, manifest)
    result = backup.verify_backup(settings, manifest.id, "restore")
    assert result.ok, result.detail
    # A hash this version cannot compute is refused before any scratch database is made.
    manifest.content_hash_algorithm = "some-future-hash-v9"
    backup.write_manifest(storage, manifest)
    with pytest.raises(backup.BackupError, match="some-future-hash-v9"):
        backup.verify_backup(settings, manifest.id, "restore")
    assert scratch_databases(f"{name}__") == []
