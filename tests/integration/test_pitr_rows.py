"""The rows of a recovered database in streams of their own, on a private PostgreSQL 15 cluster:
odd names, dropped and generated columns, inheritance, enums, domains, arrays, composite and range
columns all arrive (binary where every type allows, text where not), loaded frozen; the tables left
to pg_dump are exactly the others; and a reading that breaks off commits nothing of its table."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from tasks.backup.database import _tool_version
from tasks.backup.restore.streams import _PgRestore
from tasks.errors import CommandError
from tasks.wal.copy import _copy_and_read
from tasks.wal.rows import copy_rows
from tasks.wal.scratch import Phases, ScratchServer
from tests.fixtures.pitr import WalCluster, pitr_settings

pytestmark = pytest.mark.integration

ODD = '"Odd ""Schema"""'
SCHEMA = f"""
CREATE SCHEMA {ODD};
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
CREATE TABLE {ODD}."x*.y?" (
    id int PRIMARY KEY, moods mood[], p positive, twice int GENERATED ALWAYS AS (p * 2) STORED,
    gone int, at timestamptz, amount numeric, raw bytea, doc jsonb, tags text[]);
ALTER TABLE {ODD}."x*.y?" DROP COLUMN gone;
INSERT INTO {ODD}."x*.y?" (id, moods, p, at, amount, raw, doc, tags)
  SELECT g, ARRAY['sad', 'happy']::mood[], g, '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 s',
         g / 3.0, decode(md5(g::text), 'hex'), jsonb_build_object('g', g, 'é', 'ü'), ARRAY['a', NULL, 'c']
  FROM generate_series(1, 3000) g;
-- Would be excluded with the big one if a name's * . ? were patterns.
CREATE TABLE {ODD}."xa.yb" (id int);
INSERT INTO {ODD}."xa.yb" VALUES (1), (2);
CREATE TABLE parent (id int, note text);
CREATE TABLE child (extra int) INHERITS (parent);
INSERT INTO parent SELECT g, repeat('p', 200) FROM generate_series(1, 1000) g;
INSERT INTO child SELECT g, repeat('c', 200), g FROM generate_series(1, 1500) g;
CREATE TABLE texty (id int, pr pair, span int4range);
INSERT INTO texty SELECT g, ROW(g, 'b' || g)::pair, int4range(g, g + 10) FROM generate_series(1, 3000) g;
CREATE SEQUENCE counter START 41;
SELECT nextval('counter');
SELECT lo_from_bytea(4242, 'a large object');
"""
STREAMED = {'Odd "Schema".x*.y?': "binary", "public.parent": "binary", "public.child": "binary"}


def _settings(cluster: WalCluster, shared_dir: Path) -> object:
    return pitr_settings(cluster, f"file://{shared_dir / 'store'}", shared_dir / "spool")


def test_streamed_tables_arrive_whole_and_frozen_and_the_rest_by_pg_dump(
    wal_cluster: WalCluster, shared_dir: Path
) -> None:
    settings = _settings(wal_cluster, shared_dir)
    wal_cluster.execute(SCHEMA)
    wal_cluster.execute("CREATE DATABASE app_copy", "postgres")
    server = ScratchServer(wal_cluster.port, wal_cluster.dir, "postgres", wal_cluster.dir / "server.log")
    copied = _copy_and_read(
        settings,  # type: ignore[arg-type]
        server,
        "app",
        "app_copy",
        workdir=shared_dir,
        phases=Phases(),
        stream_min_bytes=64 << 10,
    )

    assert copied.expected == copied.actual
    assert copied.actual['Odd "Schema".xa.yb'].rows == 2
    assert copied.actual["public.parent"].rows == 1000  # ONLY the parent: the child is a table of its own
    assert copied.actual["public.child"].rows == 1500
    summary = next(c for c in copied.commands if "COPY FROM STDIN" in c)
    for name, fmt in {**STREAMED, "public.texty": "text"}.items():
        assert f"{name} ({fmt})" in summary
    assert "xa.yb" not in summary
    wal_cluster.execute("CREATE EXTENSION pg_visibility", "app_copy")
    for table in [f'{ODD}."x*.y?"', "parent", "child", "texty"]:
        frozen = wal_cluster.execute(
            f"SELECT bool_and(all_frozen) FROM pg_visibility_map('{table}')", "app_copy"
        )
        assert frozen == [(True,)], table
    # Generated columns are computed again; what pg_dump carried arrived too.
    assert wal_cluster.execute(f'SELECT twice, moods::text FROM {ODD}."x*.y?" WHERE id = 7', "app_copy") == [
        (14, "{sad,happy}")
    ]
    assert wal_cluster.execute("SELECT last_value FROM counter", "app_copy") == [(41,)]
    assert wal_cluster.execute("SELECT convert_from(lo_get(4242), 'UTF8')", "app_copy") == [
        ("a large object",)
    ]


def test_a_reading_that_breaks_off_commits_nothing_of_its_table(
    wal_cluster: WalCluster, shared_dir: Path
) -> None:
    settings = _settings(wal_cluster, shared_dir)
    wal_cluster.execute(
        "CREATE TABLE big (id int, pad text);"
        " INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 400000) g;"
    )
    wal_cluster.execute("CREATE DATABASE app_copy", "postgres")
    wal_cluster.execute("CREATE TABLE big (id int, pad text)", "app_copy")
    restore = _PgRestore.into(settings, "app_copy", _tool_version(settings, "pg_dump"))  # type: ignore[arg-type]
    source = f"host={wal_cluster.dir} port={wal_cluster.port} user=postgres dbname=app"
    stop = threading.Event()

    def cut() -> None:
        # End the scratch side's COPY once rows are flowing.
        with psycopg.connect(wal_cluster.dsn("postgres"), autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = 'app' AND query LIKE 'COPY%TO STDOUT%'"
                ).fetchone()
                if row is not None:
                    time.sleep(0.2)
                    conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    return
                time.sleep(0.01)

    cutter = threading.Thread(target=cut)
    cutter.start()
    try:
        with pytest.raises(CommandError, match="psql"):
            copy_rows(
                settings,  # type: ignore[arg-type]
                source,
                "app_copy",
                restore,
                ["pg_dump", "--no-password", f"--dbname={source}"],
                stream_min_bytes=1 << 20,
            )
    finally:
        stop.set()
        cutter.join()
    assert wal_cluster.execute("SELECT count(*) FROM big", "app_copy") == [(0,)]
