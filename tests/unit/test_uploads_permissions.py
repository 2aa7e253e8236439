"""Permission denied is reported, not fatal.

Tests run as root, and root reads any directory whatever its mode. So the cleanup runs here in a
child process that drops to the unprivileged user ``nobody`` (``os.setgid``/``os.setuid``) after its
imports, against a real tree whose modes deny that user: a directory it cannot open, and a directory
it can list but not change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
NOBODY = 65534
DAY = 86400

CHILD = r"""
import json, os, sys, time
from pathlib import Path
from tasks import uploads
from tasks.settings import UploadsSettings

os.setgroups([])
os.setgid(int(sys.argv[3]))
os.setuid(int(sys.argv[3]))
assert os.geteuid() != 0
root, plans = Path(sys.argv[1]), Path(sys.argv[2])
settings = UploadsSettings(root=root)
check = uploads.check_root(settings)
run_id = uploads.new_run_id()
outcome = uploads.clean_uploads(
    settings, None, root=check.path, cutoff=time.time() - 30 * 86400, run_id=run_id,
    plan_path=plans / "plan.jsonl", mode="delete", confirm=True,
)
stats, removal = outcome.plan.stats, outcome.removal
print(json.dumps({
    "scanned": stats.scanned_files, "planned": stats.planned, "acted": removal.acted,
    "scan_errors": stats.errors.items, "removal_errors": removal.errors.items,
}))
"""


def put(path: Path, age_days: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))


@pytest.fixture
def world_base() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the user nobody")
    base = Path(tempfile.mkdtemp(prefix="uploads-perm-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_unreadable_and_unwritable_directories_are_reported_not_fatal(world_base: Path) -> None:
    root, plans = world_base / "uploads", world_base / "plans"
    put(root / "mine" / "old.bin", 60)
    put(root / "mine" / "new.bin", 1)
    put(root / "listable" / "old.bin", 60)
    put(root / "locked" / "old.bin", 60)
    put(root / "locked" / "inner" / "old.bin", 60)
    plans.mkdir()
    for path in (root / "mine", root / "mine" / "old.bin", root / "mine" / "new.bin", plans):
        os.chown(path, NOBODY, NOBODY)
    for path in (root, root / "listable"):
        path.chmod(0o755)
    (root / "locked").chmod(0o700)

    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(plans), str(NOBODY)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["scanned"] == 3  # mine/old, mine/new, listable/old; nothing under locked/
    assert report["planned"] == 2
    assert report["acted"] == 1
    assert [e[:2] for e in report["scan_errors"]] == [["locked", "open directory"]]
    assert "Permission denied" in report["scan_errors"][0][2]
    assert [e[:2] for e in report["removal_errors"]] == [["listable/old.bin", "delete"]]
    assert "Permission denied" in report["removal_errors"][0][2]
    assert not (root / "mine" / "old.bin").exists()
    assert (root / "mine" / "new.bin").exists()
    assert (root / "listable" / "old.bin").exists()
    assert (root / "locked" / "old.bin").exists()
    assert (root / "locked" / "inner" / "old.bin").exists()
