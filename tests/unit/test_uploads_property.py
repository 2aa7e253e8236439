"""Properties of the uploads cleanup on random real trees: nothing outside the plan is ever lost,
nothing outside the root is ever touched, and a quarantine run restores to the original tree."""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks import uploads
from tasks.settings import UploadsSettings

DAY = 86400
NAMES = ["a", "b c", "d\ne", os.fsdecode(b"\xff\xfe"), ".gitkeep", "keep", "x.pdf", "-n", "*"]
AGES = [0.5, 29.9, 30.1, 45, 400]

entries = st.lists(
    st.tuples(
        st.lists(st.sampled_from(NAMES), min_size=0, max_size=3),  # directories
        st.sampled_from(NAMES),  # name
        st.sampled_from(["file", "file", "file", "link-out-dir", "link-out-file", "link-loop", "link-in"]),
        st.sampled_from(AGES),
    ),
    max_size=25,
)


def snapshot(top: Path) -> dict[bytes, tuple[str, bytes | None]]:
    result: dict[bytes, tuple[str, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(top)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, os.fsencode(top))
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                result[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(info.st_mode):
                result[rel] = ("dir", None)
            else:
                with open(full, "rb") as handle:
                    result[rel] = (f"file@{int(info.st_mtime)}", handle.read())
    return result


def build(root: Path, outside: Path, spec: list) -> None:
    now = time.time()
    for dirs, name, kind, age in spec:
        parent = root.joinpath(*dirs)
        if any(os.path.islink(root.joinpath(*dirs[: i + 1])) for i in range(len(dirs))):
            continue  # the setup itself never writes through a symlink
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue  # a file already holds that name
        target = parent / name
        if os.path.lexists(target):
            continue
        if kind == "file":
            target.write_bytes(os.fsencode(str(target.relative_to(root))))
            os.utime(target, (now - age * DAY, now - age * DAY))
        elif kind == "link-out-dir":
            os.symlink(outside, target)
        elif kind == "link-out-file":
            os.symlink(outside / "victim", target)
        elif kind == "link-loop":
            os.symlink(name, target)
        else:
            os.symlink(root, target)


def expected_plan(before: dict[bytes, tuple[str, bytes | None]], cutoff: float) -> set[bytes]:
    chosen = set()
    for rel, (kind, _) in before.items():
        if not kind.startswith("file@") or int(kind[5:]) >= cutoff - 1:
            continue
        if os.path.basename(rel) == b".gitkeep" or rel.startswith(b"keep/"):
            continue
        chosen.add(rel)
    return chosen


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=entries, mode=st.sampled_from(["quarantine", "delete"]))
def test_random_trees_lose_nothing_outside_the_plan(spec: list, mode: uploads.Mode) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        root, outside = base / "uploads", base / "outside"
        root.mkdir()
        outside.mkdir()
        (outside / "victim").write_bytes(b"outside")
        os.utime(outside / "victim", (1, 1))
        (outside / "old").write_bytes(b"outside, old")
        os.utime(outside / "old", (1, 1))
        build(root, outside, spec)
        before, before_outside = snapshot(root), snapshot(outside)
        cutoff = time.time() - 30 * DAY
        settings_ = UploadsSettings(root=root)
        check = uploads.check_root(settings_)
        quarantine = (
            uploads.prepare_quarantine(settings_, check, create=True) if mode == "quarantine" else None
        )
        run_id = uploads.new_run_id()

        outcome = uploads.clean_uploads(
            settings_,
            None,
            root=check.path,
            cutoff=cutoff,
            run_id=run_id,
            plan_path=base / "plans" / "plan.jsonl",
            mode=mode,
            confirm=True,
            quarantine=quarantine,
        )

        plan = {os.fsencode(e.rel) for e in uploads.read_jsonl(Path(outcome.plan.plan_path))}
        assert plan == expected_plan(before, cutoff)
        assert outcome.removal.acted == len(plan)
        after = snapshot(root)
        for rel, item in before.items():
            if rel in plan:
                assert rel not in after
            else:
                assert after.get(rel) == item, rel
        assert set(after) <= set(before)
        assert snapshot(outside) == before_outside
        if quarantine is not None:
            moved = quarantine / run_id / "files"
            for rel in plan:
                with open(os.path.join(os.fsencode(moved), rel), "rb") as handle:
                    assert (before[rel][0], handle.read()) == before[rel]
            uploads.restore_quarantine_run(check.path, quarantine, run_id, confirm=True)
            assert snapshot(root) == before
        assert snapshot(outside) == before_outside
