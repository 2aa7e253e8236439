"""PostgreSQL client programs: which ``pg_dump`` / ``pg_restore`` serves a given server.

A ``pg_dump`` older than the server refuses to dump it, and a ``pg_restore`` older than the ``pg_dump``
that wrote an archive cannot read it. Debian's wrapper (``/usr/bin/pg_dump``) runs the newest installed
major, so a 17 client would dump a 15 server into an archive that the 15 tools elsewhere (a host that
restores it, an older image) cannot read. So when the setting is the bare program name (the default),
the program is taken from Debian's per-major layout, ``/usr/lib/postgresql/<major>/bin``: the server's
own major when installed, else the oldest installed newer one; a server newer than every installed
client is refused before anything runs, naming what to install. A setting naming another program or a
path is used as given, its version checked the same way.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.commands import run_command
from tasks.errors import CommandError, OpsError

# Debian's layout (postgresql-client-<major>), the one the image installs every major into.
CLIENT_ROOT = Path("/usr/lib/postgresql")
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class ClientTooOld(OpsError):
    """No installed client program can serve the server (or read the archive); nothing was run."""


@dataclass(frozen=True)
class ClientProgram:
    """A client program chosen for a server: its path (or name on PATH) and major version."""

    tool: str
    path: str
    major: int


def server_major(version: str) -> int:
    """The major of a ``server_version`` (``15.18 (Debian 15.18-0+deb12u1)``, ``17beta1``) or of a
    tool's ``--version`` line (``pg_dump (PostgreSQL) 15.18``).

    Raises:
        ValueError: no version number in ``version``.
    """
    found = _VERSION.search(version) or re.match(r"\s*(\d+)(?:\.(\d+))?", version)
    if not found:
        raise ValueError(f"no PostgreSQL version in {version!r}")
    # Before 10 the major had two parts (9.6): such a server counts as 9, older than any client here.
    return int(found.group(1))


def installed_majors(tool: str, root: Path = CLIENT_ROOT) -> dict[int, Path]:
    """``{major: path}`` of ``tool`` in the per-major layout under ``root`` (empty when there is none)."""
    found: dict[int, Path] = {}
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        program = entry / "bin" / tool
        if entry.name.isdigit() and program.is_file():
            found[int(entry.name)] = program
    return dict(sorted(found.items()))


def program_major(program: str) -> int:
    """The major of ``program --version``.

    Raises:
        ClientTooOld: the program is missing or prints no PostgreSQL version.
    """
    try:
        line = run_command([program, "--version"], timeout=30, log_output=False).stdout
        return server_major(line)
    except (CommandError, ValueError) as exc:
        raise ClientTooOld(f"{program} --version gave no PostgreSQL version: {exc}") from None


def choose_client(
    tool: str,
    configured: str,
    major: int,
    *,
    reads_archive_of: int | None = None,
    root: Path = CLIENT_ROOT,
) -> ClientProgram:
    """The ``tool`` program for a server of ``major``.

    Args:
        tool: ``pg_dump`` or ``pg_restore``.
        configured: the setting (``OPS_BACKUP__PG_DUMP`` ...); the bare ``tool`` name means choose.
        major: the server's major version.
        reads_archive_of: for pg_restore, the major of the pg_dump that wrote the archive (it must
            not be newer than the pg_restore).
        root: the per-major layout (``<root>/<major>/bin/<tool>``).

    Returns:
        The program: the server's major when installed, else the oldest newer one.

    Raises:
        ClientTooOld: every installed ``tool`` is older than the server (or the archive); names what
            to install.
    """
    needed = max(major, reads_archive_of or 0)
    what = f"PostgreSQL {major} server"
    if reads_archive_of and reads_archive_of > major:
        what += f" and an archive of pg_dump {reads_archive_of}"
    installed = installed_majors(tool, root) if configured == tool else {}
    if installed:
        usable = sorted(m for m in installed if m >= needed)
        if not usable:
            newest = max(installed)
            raise ClientTooOld(
                f"the {what} needs {tool} {needed} or newer, but the newest installed is {newest}"
                f" ({installed[newest]}); nothing was run. Install postgresql-client-{needed} (the image:"
                f" build with --build-arg POSTGRES_MAJORS including {needed}) or set"
                f" OPS_BACKUP__{tool.upper()} to a {tool} of {needed} or newer"
            )
        chosen = needed if needed in usable else usable[0]
        return ClientProgram(tool=tool, path=str(installed[chosen]), major=chosen)
    program = shutil.which(configured) or configured
    found = program_major(program)
    if found < needed:
        raise ClientTooOld(
            f"the {what} needs {tool} {needed} or newer, but {program} is {found}; nothing was run."
            f" Install postgresql-client-{needed} or set OPS_BACKUP__{tool.upper()} to a {tool} of"
            f" {needed} or newer"
        )
    return ClientProgram(tool=tool, path=program, major=found)
