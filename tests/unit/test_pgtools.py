"""Choosing pg_dump/pg_restore by the server's major (tasks/pgtools.py), over a per-major layout of
small programs that answer ``--version`` as the real ones do; the image test checks the real layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.pgtools import ClientTooOld, choose_client, installed_majors, server_major


def layout(root: Path, *majors: int) -> Path:
    for major in majors:
        for tool in ("pg_dump", "pg_restore"):
            program = root / str(major) / "bin" / tool
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) {major}.4 (Debian {major}.4-1)'\n")
            program.chmod(0o755)
    return root


@pytest.mark.parametrize(
    ("version", "major"),
    [
        ("15.18 (Debian 15.18-0+deb12u1)", 15),
        ("17beta1", 17),
        ("pg_dump (PostgreSQL) 16.4 (Debian 16.4-1.pgdg120+1)", 16),
        ("9.6.24", 9),
    ],
)
def test_server_major(version: str, major: int) -> None:
    assert server_major(version) == major


def test_the_servers_own_major_when_installed(tmp_path: Path) -> None:
    root = layout(tmp_path, 13, 15, 17)
    assert list(installed_majors("pg_dump", root)) == [13, 15, 17]
    chosen = choose_client("pg_dump", "pg_dump", 15, root=root)
    assert (chosen.major, chosen.path) == (15, str(root / "15" / "bin" / "pg_dump"))


def test_else_the_oldest_newer_major(tmp_path: Path) -> None:
    root = layout(tmp_path, 13, 15, 17)
    assert choose_client("pg_dump", "pg_dump", 14, root=root).major == 15


def test_a_server_newer_than_every_client_is_refused_naming_what_to_install(tmp_path: Path) -> None:
    root = layout(tmp_path, 13, 15)
    with pytest.raises(ClientTooOld) as refused:
        choose_client("pg_dump", "pg_dump", 17, root=root)
    message = str(refused.value)
    assert "PostgreSQL 17 server" in message
    assert "newest installed is 15" in message
    assert "postgresql-client-17" in message
    assert "nothing was run" in message


def test_pg_restore_reads_the_archive_of_a_newer_pg_dump(tmp_path: Path) -> None:
    root = layout(tmp_path, 15, 16)
    # A 15 server, an archive written by pg_dump 16: pg_restore 15 could not read it.
    assert choose_client("pg_restore", "pg_restore", 15, reads_archive_of=16, root=root).major == 16
    with pytest.raises(ClientTooOld, match="archive of pg_dump 17"):
        choose_client("pg_restore", "pg_restore", 15, reads_archive_of=17, root=root)


def test_a_configured_program_is_used_as_given_and_its_version_checked(tmp_path: Path) -> None:
    root = layout(tmp_path / "layout", 15, 17)
    own = layout(tmp_path / "own", 16) / "16" / "bin" / "pg_dump"
    chosen = choose_client("pg_dump", str(own), 15, root=root)
    assert (chosen.path, chosen.major) == (str(own), 16)
    with pytest.raises(ClientTooOld, match=f"{own} is 16"):
        choose_client("pg_dump", str(own), 17, root=root)


def test_without_the_layout_the_program_on_path_is_checked(tmp_path: Path) -> None:
    own = layout(tmp_path / "own", 15) / "15" / "bin" / "pg_dump"
    assert choose_client("pg_dump", str(own), 15, root=tmp_path / "none").major == 15
    with pytest.raises(ClientTooOld):
        choose_client("pg_dump", str(own), 16, root=tmp_path / "none")
