"""The copy step of a restore to a point, on a private PostgreSQL 15 cluster: the recovered database
is copied by sections (schema file, rows streamed, indexes and constraints with jobs) while both
sides' tables are counted and hashed. Whatever a whole dump carries must arrive: rows, sequence
positions, large objects, indexes, foreign keys, triggers, row security; and the two readings agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.wal.copy import _copy_and_read
from tasks.wal.scratch import Phases, ScratchServer
from tests.fixtures.pitr import WalCluster, pitr_settings

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL UNIQUE, created timestamptz);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL REFERENCES customers (id),
                     total numeric(10, 2), doc jsonb, attachment oid);
CREATE INDEX orders_customer ON orders (customer);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.total := NEW.total + 1000;
  RETURN NEW; END $$;
CREATE TRIGGER orders_touch BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION touch();
INSERT INTO customers (name, created) SELECT 'c' || g, '2026-01-01'::timestamptz + g * interval '1 h'
  FROM generate_series(1, 300) g;
INSERT INTO orders (customer, total, doc) SELECT 1 + g % 300, g / 7.0, jsonb_build_object('n', g)
  FROM generate_series(1, 2000) g;
UPDATE orders SET attachment = lo_from_bytea(0, 'scan of order 7'::bytea) WHERE id = 7;
"""


def _copy(cluster: WalCluster, settings: object, source: str, workdir: Path) -> tuple[object, Phases]:
    cluster.execute(f"CREATE DATABASE {source}_copy", "postgres")
    server = ScratchServer(cluster.port, cluster.dir, "postgres", cluster.dir / "server.log")
    phases = Phases()
    copied = _copy_and_read(
        settings,  # type: ignore[arg-type]
        server,
        source,
        f"{source}_copy",
        workdir=workdir,
        phases=phases,
    )
    return copied, phases


def test_the_sectioned_copy_carries_everything_and_both_readings_agree(
    wal_cluster: WalCluster, shared_dir: Path
) -> None:
    settings = pitr_settings(wal_cluster, f"file://{shared_dir / 'store'}", shared_dir / "spool")
    wal_cluster.execute(SCHEMA)
    wal_cluster.execute("CREATE DATABASE secured", "postgres")
    wal_cluster.execute(
        "CREATE TABLE notes (id int PRIMARY KEY, owner text, body text);"
        " INSERT INTO notes SELECT g, 'u' || g % 3, md5(g::text) FROM generate_series(1, 90) g;"
        " ALTER TABLE notes ENABLE ROW LEVEL SECURITY;"
        " CREATE POLICY own ON notes USING (owner = current_user);",
        "secured",
    )

    copied, phases = _copy(wal_cluster, settings, "app", shared_dir)

    assert copied.expected == copied.actual  # type: ignore[attr-defined]
    assert copied.actual["public.orders"].rows == 2000  # type: ignore[attr-defined]
    assert list(phases.seconds) == [
        "copy schema",
        "copy rows",
        "build indexes and constraints",
        "compare tables",
    ]
    # The trigger came after the rows (totals unchanged), and works for new rows.
    assert wal_cluster.execute("SELECT sum(total) FROM orders", "app_copy") == wal_cluster.execute(
        "SELECT sum(total) FROM orders", "app"
    )
    wal_cluster.execute("INSERT INTO orders (customer, total) VALUES (1, 1)", "app_copy")
    # Sequences continue where the recovered database stood.
    assert wal_cluster.execute("SELECT id, total FROM orders ORDER BY id DESC LIMIT 1", "app_copy") == [
        (2001, 1001)
    ]
    assert wal_cluster.execute("SELECT nextval('customers_id_seq')", "app_copy")[0][0] == 301
    # The large object, its content, and the indexes and the foreign key.
    assert (
        wal_cluster.execute("SELECT lo_get(attachment) FROM orders WHERE id = 7", "app_copy")[0][0]
        == b"scan of order 7"
    )
    indexes = {r[0] for r in wal_cluster.execute("SELECT indexname FROM pg_indexes", "app_copy")}
    assert {"orders_pkey", "orders_customer", "customers_pkey", "customers_name_key"} <= indexes
    with pytest.raises(Exception, match="foreign key"):
        wal_cluster.execute("INSERT INTO orders (customer) VALUES (999)", "app_copy")

    # Row security: the copy is read after its policies exist.
    secured, _ = _copy(wal_cluster, settings, "secured", shared_dir)
    assert secured.expected == secured.actual  # type: ignore[attr-defined]
    assert secured.actual["public.notes"].rows == 90  # type: ignore[attr-defined]
    assert wal_cluster.execute(
        "SELECT relrowsecurity FROM pg_class WHERE relname = 'notes'", "secured_copy"
    ) == [(True,)]
    assert wal_cluster.execute("SELECT polname FROM pg_policy", "secured_copy") == [("own",)]
