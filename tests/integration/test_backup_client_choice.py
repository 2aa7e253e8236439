"""Which pg_dump a backup runs, against the real PostgreSQL: the server's own major from Debian's
per-major layout, and a client older than the server refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tasks import backup
from tasks.pgtools import ClientTooOld, installed_majors, server_major
from tests.fixtures.s3 import backup_settings, populate_backup_source

pytestmark = pytest.mark.integration


def _server_major(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return server_major(str(conn.execute("SHOW server_version").fetchone()[0]))  # type: ignore[index]


def test_a_backup_runs_the_pg_dump_of_the_servers_major(pg_database: tuple[str, str], tmp_path: Path) -> None:
    _, dsn = pg_database
    populate_backup_source(dsn)
    major = _server_major(dsn)
    assert major in installed_majors("pg_dump"), "this host has no client of its own server's major"
    manifest = backup.create_backup(backup_settings(dsn, f"file://{tmp_path}"), verify="catalog")
    assert f"pg_dump (PostgreSQL) {major}." in manifest.pg_dump_version
    assert [(v.level, v.ok) for v in manifest.verifications] == [("catalog", True)]


def test_a_pg_dump_older_than_the_server_is_refused_before_anything_is_written(
    pg_database: tuple[str, str], tmp_path: Path
) -> None:
    _, dsn = pg_database
    older = _server_major(dsn) - 1
    # A client of the major before the server's, as OPS_BACKUP__PG_DUMP would name it.
    program = tmp_path / "bin" / "pg_dump"
    program.parent.mkdir()
    program.write_text(f"#!/bin/sh\necho 'pg_dump (PostgreSQL) {older}.9'\nexit 0\n")
    program.chmod(0o755)
    storage = tmp_path / "backups"
    settings = backup_settings(dsn, f"file://{storage}", backup={"pg_dump": str(program)})
    with pytest.raises(ClientTooOld) as refused:
        backup.create_backup(settings, verify="none")
    assert f"{program} is {older}; nothing was run" in str(refused.value)
    assert not [p for p in storage.rglob("*") if p.is_file()]
