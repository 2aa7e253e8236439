"""A ``restore_command`` for a recovery run by hand: ``python -m tasks.wal.fetch %f %p``; and the
fetch of one WAL file the restore's own staging uses (:func:`fetch_to`).

Fetches WAL file ``%f`` from the archive, checks the stored object's sha256 and the unpacked content
against the segment's record, and writes it to ``%p`` (through a temporary name, so PostgreSQL never
reads half a file). When a segment was only shipped as ``.partial`` (the newest one), that is served:
its valid records replay and recovery ends where it ends. Exit 0 on success, 1 when the file is not
archived (PostgreSQL asks for files that do not exist, e.g. the next timeline's history) or does not
match its checksums (the reason is printed to stderr, which lands in the server log).

Settings come from the environment (``OPS_STORAGE__*``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.errors import OpsError
from tasks.settings import load_settings
from tasks.storage import Storage, open_storage
from tasks.wal import archive
from tasks.wal.names import PARTIAL_SUFFIX, is_segment_name


def fetch_to(storage: Storage, name: str, target: Path) -> bool:
    """Write WAL file ``name`` (or, for a segment only shipped partially, its partial) to ``target``.

    Returns:
        False when it is not archived.

    Raises:
        SegmentCorrupt: it does not match its record.
    """
    try:
        raw = archive.fetch(storage, name)
    except archive.SegmentMissing:
        if not is_segment_name(name):
            return False
        try:
            raw = archive.fetch(storage, name + PARTIAL_SUFFIX)
        except archive.SegmentMissing:
            return False
        print(f"tasks.wal.fetch: {name}: serving the partial segment (the newest WAL)", file=sys.stderr)
    temp = target.with_name(target.name + ".fetching")
    temp.write_bytes(raw)
    os.replace(temp, target)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tasks.wal.fetch WALFILE DESTINATION", file=sys.stderr)
        return 2
    name, destination = argv
    try:
        storage = open_storage(load_settings().storage)
        return 0 if fetch_to(storage, name, Path(destination)) else 1
    except (OpsError, archive.SegmentCorrupt) as exc:
        print(f"tasks.wal.fetch: {name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
