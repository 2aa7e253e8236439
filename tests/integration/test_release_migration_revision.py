"""Reading the database's migration revision for release records, on the real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from pydantic import SecretStr

from tasks.releases import read_migration_revision
from tasks.settings import PostgresSettings

pytestmark = pytest.mark.integration


def _pg(dsn: str) -> PostgresSettings:
    return PostgresSettings(dsn=SecretStr(dsn))


def test_none_when_the_database_has_no_migration_table(pg_database):
    _, dsn = pg_database
    found = read_migration_revision(_pg(dsn))
    assert found.revision is None
    assert "no migration table" in found.source


def test_alembic_version_wins(pg_database):
    _, dsn = pg_database
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('ae1027a6acf')")
        conn.execute("CREATE TABLE schema_info (v text)")
        conn.execute("INSERT INTO schema_info VALUES ('ignored')")
    found = read_migration_revision(_pg(dsn), "SELECT v FROM schema_info")
    assert (found.revision, found.source) == ("ae1027a6acf", "alembic_version")


def test_configured_query_then_prisma(pg_database):
    _, dsn = pg_database
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE _prisma_migrations (id text, migration_name text, finished_at timestamptz,"
            " rolled_back_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO _prisma_migrations VALUES ('1', '20240101_init', now() - interval '1 day', NULL),"
            " ('2', '20240201_add_jobs', now(), NULL), ('3', '20240301_broken', NULL, NULL)"
        )
        conn.execute("CREATE TABLE schema_info (v text)")
        conn.execute("INSERT INTO schema_info VALUES ('42')")
    assert read_migration_revision(_pg(dsn), "SELECT v FROM schema_info").revision == "42"
    found = read_migration_revision(_pg(dsn))
    assert (found.revision, found.source) == ("20240201_add_jobs", "_prisma_migrations")


def test_unreachable_database_gives_none_with_a_masked_reason():
    found = read_migration_revision(_pg("postgresql://ops:hunter2secret@127.0.0.1:1/app"))
    assert found.revision is None
    assert "unreachable" in found.source
    assert "hunter2secret" not in found.source
