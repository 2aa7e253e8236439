"""WAL retention and partial segments: a partial older than the first kept segment goes with the
finished ones, also when its timeline ended in it (a promotion) and no finished segment of that name
was ever archived; a partial the kept base backups need stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.settings import load_settings
from tasks.storage import Storage, open_storage
from tasks.wal import archive


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return open_storage(load_settings(storage={"url": f"file://{tmp_path / 'store'}"}).storage)


def _ship(storage: Storage, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(name.encode() * 64)
    archive.ship_file(storage, path, name=name)


def test_old_partials_go_with_the_segments_before_the_first_kept(storage: Storage, tmp_path: Path) -> None:
    for name in [
        "000000010000000000000003",
        "000000010000000000000004",
        "000000010000000000000005.partial",  # timeline 1 ended here: promoted at 0/5xxxxxx
        "000000020000000000000005",
        "000000020000000000000006",
        "000000020000000000000007.partial",  # the newest WAL: kept
    ]:
        _ship(storage, tmp_path, name)

    dry = archive.delete_before(storage, "000000020000000000000006")
    assert dry == [
        "000000010000000000000003",
        "000000010000000000000004",
        "000000010000000000000005.partial",
        "000000020000000000000005",
    ]
    assert len(archive.list_archive(storage).partials) == 2  # a dry run deletes nothing

    assert archive.delete_before(storage, "000000020000000000000006", confirm=True) == dry
    listing = archive.list_archive(storage)
    assert sorted(listing.segments) == ["000000020000000000000006"]
    assert sorted(listing.partials) == ["000000020000000000000007"]
    assert not [o.key for o in storage.list(archive.WAL_DIR) if "000000010000000000000005" in o.key]
