"""The one-pass delete (no reference query): files that change between the scan and their unlink, a
flat directory larger than one batch, and the deleting helper process going away."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks import uploads
from tasks.settings import UploadsSettings
from tests.unit.test_uploads_scan import CUTOFF, put


def tree_bytes(top: Path) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(top))
            if full.is_symlink():
                found[rel] = "-> " + os.readlink(full)
            elif full.is_file():
                found[rel] = full.read_bytes()
    return found


@pytest.mark.parametrize("helper", [True, False], ids=["helper-process", "in-process"])
def test_files_changed_between_scan_and_unlink_are_kept_and_reported(tmp_path: Path, helper: bool) -> None:
    root, outside = tmp_path / "uploads", tmp_path / "outside"
    for name in ("touched", "replaced", "now-link", "gone", "chmodded", "untouched"):
        put(root / "d" / name, 60, name.encode())
    put(outside / "secret", 90, b"must survive")
    stats = uploads.ScanStats()
    walk = uploads._walk_old_files(root, CUTOFF, stats)
    record = uploads.RemovalRecord(run_id="r", mode="delete", confirmed=True, root=str(root))
    remover = uploads._Remover(record, CUTOFF, helper=helper)
    try:
        fd, prefix, found = next(walk)
        assert (prefix, len(found)) == ("d/", 6)
        # Between the scan's lstat and the re-check before each unlink:
        os.utime(root / "d" / "touched")
        (root / "d" / "replaced").unlink()
        put(root / "d" / "replaced", 60, b"another file, same name and age")
        (root / "d" / "now-link").unlink()
        os.symlink(outside / "secret", root / "d" / "now-link")
        (root / "d" / "gone").unlink()
        os.chmod(root / "d" / "chmodded", 0o600)
        remover.submit(fd, prefix, found)
        with pytest.raises(StopIteration):
            next(walk)
        remover.finish()
    finally:
        remover.abort()
        walk.close()

    assert (record.acted, record.kept_changed, record.errors.count) == (1, 5, 0)
    assert record.acted_bytes == len(b"untouched")
    reasons = dict(record.changed)
    assert "modified since the plan" in reasons["d/touched"]
    assert "differs" in reasons["d/replaced"]  # a freed inode number may be reused at once
    assert "no longer a regular file" in reasons["d/now-link"]
    assert reasons["d/gone"] == "gone"
    assert "inode change time" in reasons["d/chmodded"]
    assert tree_bytes(root / "d") == {
        "touched": b"touched",
        "replaced": b"another file, same name and age",
        "now-link": "-> " + str(outside / "secret"),
        "chmodded": b"chmodded",
    }
    assert tree_bytes(outside) == {"secret": b"must survive"}


def test_a_flat_directory_larger_than_one_batch_is_planned_and_deleted_exactly(tmp_path: Path) -> None:
    root, plans = tmp_path / "uploads", tmp_path / "plans"
    old_count = 2 * uploads.FOUND_CHUNK + 7
    for i in range(old_count):
        put(root / f"old-{i:05d}.bin", 40, b"x" * (i % 5))
    for i in range(50):
        put(root / f"new-{i:03d}.bin", 2)
    put(root / ".gitkeep", 400)

    sizes = [len(found) for _, _, found in uploads._walk_old_files(root, CUTOFF, uploads.ScanStats())]
    assert max(sizes) <= uploads.FOUND_CHUNK
    assert sum(sizes) == old_count + 1

    run_id = uploads.new_run_id()
    outcome = uploads.clean_uploads(
        UploadsSettings(root=root, protect=[".gitkeep"]),
        None,
        root=root,
        cutoff=CUTOFF,
        run_id=run_id,
        plan_path=plans / f"plan-{run_id}.jsonl",
        mode="delete",
        confirm=True,
    )

    planned = {entry.rel for entry in uploads.read_jsonl(Path(outcome.plan.plan_path))}
    assert planned == {f"old-{i:05d}.bin" for i in range(old_count)}
    assert outcome.plan.complete
    assert outcome.plan.stats.protected == 1
    removal = outcome.removal
    assert (removal.planned, removal.acted, removal.kept_changed) == (old_count, old_count, 0)
    assert removal.acted_bytes == sum(i % 5 for i in range(old_count))
    assert sorted(p.name for p in root.iterdir()) == [".gitkeep", *(f"new-{i:03d}.bin" for i in range(50))]


def test_the_helper_going_away_fails_the_run_clearly_and_touches_nothing_more(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    for i in range(10):
        put(root / "d" / f"old-{i}", 60)
    record = uploads.RemovalRecord(run_id="r", mode="delete", confirmed=True, root=str(root))
    remover = uploads._Remover(record, CUTOFF)
    walk = uploads._walk_old_files(root, CUTOFF, uploads.ScanStats())
    try:
        assert remover._process is not None
        remover._process.kill()
        remover._process.wait()
        fd, prefix, found = next(walk)
        with pytest.raises(uploads.UploadsError, match="deleting helper process stopped"):
            remover.submit(fd, prefix, found)
            remover.finish()
    finally:
        remover.abort()
        walk.close()
    assert len(list((root / "d").iterdir())) == 10
    assert record.acted == 0
