"""Uploads cleanup on real files: adversarial trees, plan records, quarantine, restore, purge."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tasks import uploads
from tasks.errors import ParameterError
from tasks.settings import DEFAULT_STATE_DIR, StorageSettings, UploadsSettings
from tasks.uploads import FileEntry, PlanInvalid, ProtectMatcher, QuarantineInvalid

DAY = 86400
NOW = time.time()
CUTOFF = NOW - 30 * DAY


def put(path: Path, age_days: float, content: bytes = b"data") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    when = NOW - age_days * DAY
    os.utime(path, (when, when))
    return path


def snapshot(top: Path) -> dict[bytes, tuple[str, bytes | None]]:
    """Every entry below ``top`` (symlinks not followed): kind and content/target."""
    result: dict[bytes, tuple[str, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(top)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, os.fsencode(top))
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                result[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(mode):
                result[rel] = ("dir", None)
            elif stat.S_ISREG(mode):
                with open(full, "rb") as handle:
                    result[rel] = ("file", handle.read())
            else:
                result[rel] = ("special", None)
    return result


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """An uploads root, an outside directory with a secret, and where plans and quarantine go."""
    root = tmp_path / "uploads"
    outside = tmp_path / "outside"
    root.mkdir()
    put(outside / "secret.txt", 90, b"must survive")
    put(outside / "old.bin", 90, b"outside, old")
    return {"root": root, "outside": outside, "plans": tmp_path / "plans", "tmp": tmp_path}


def run_cleanup(
    settings: UploadsSettings,
    plans: Path,
    *,
    confirm: bool,
    mode: uploads.Mode = "quarantine",
    from_plan: Path | None = None,
    cutoff: float = CUTOFF,
) -> uploads.CleanupOutcome:
    root = uploads.check_root(settings)
    quarantine = uploads.prepare_quarantine(settings, root, create=confirm) if mode == "quarantine" else None
    run_id = uploads.new_run_id()
    return uploads.clean_uploads(
        settings,
        None,
        root=root.path,
        cutoff=cutoff,
        run_id=run_id,
        plan_path=plans / f"uploads-plan-{run_id}.jsonl",
        mode=mode,
        confirm=confirm,
        quarantine=quarantine,
        from_plan=from_plan,
    )


def planned_paths(outcome: uploads.CleanupOutcome) -> set[str]:
    return {entry.rel for entry in uploads.read_jsonl(Path(outcome.plan.plan_path))}


def test_adversarial_tree_plans_only_old_regular_files_inside_the_root(layout: dict[str, Path]) -> None:
    root, outside = layout["root"], layout["outside"]
    put(root / "a" / "old.pdf", 45)
    put(root / "a" / "new.pdf", 2)
    put(root / "with space.txt", 40)
    put(root / "line\nbreak.txt", 40)
    put(root / os.fsdecode(b"latin1-\xe9t\xe9.txt"), 40)
    put(root / "deep" / "x" / "y" / "z" / "old.json", 100)
    put(root / ".gitkeep", 400)
    put(root / "a" / ".gitkeep", 400)
    put(root / "keep" / "logo.png", 400)
    put(root / "keep" / "nested" / "doc.pdf", 400)
    os.symlink(outside, root / "link-to-outside-dir")
    os.symlink(outside / "secret.txt", root / "link-to-outside-file")
    os.symlink(outside / "old.bin", root / "a" / "old-link.bin")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink(".", root / "a" / "self")
    os.mkfifo(root / "a" / "fifo")
    before_outside = snapshot(outside)
    before_root = snapshot(root)

    outcome = run_cleanup(UploadsSettings(root=root), layout["plans"], confirm=False)

    assert planned_paths(outcome) == {
        "a/old.pdf",
        "with space.txt",
        "line\nbreak.txt",
        os.fsdecode(b"latin1-\xe9t\xe9.txt"),
        "deep/x/y/z/old.json",
    }
    stats = outcome.plan.stats
    assert stats.scanned_files == 10
    assert stats.matched == 9
    assert stats.protected == 4
    assert stats.planned == 5
    assert stats.skipped_symlinks == 6
    assert stats.skipped_special == 1
    assert stats.errors.count == 0
    assert outcome.removal.acted == 5
    assert not outcome.removal.confirmed
    # A dry run changes nothing, inside or outside.
    assert snapshot(root) == before_root
    assert snapshot(outside) == before_outside


def test_quarantine_moves_exactly_the_plan_and_restore_puts_it_back(layout: dict[str, Path]) -> None:
    root, outside = layout["root"], layout["outside"]
    odd = os.fsdecode(b"bin\xff\xfe name\n.dat")
    for rel in ("a/b/old1", "a/old2", odd, "new/keepme"):
        put(root / rel, 60 if rel != "new/keepme" else 1, rel.encode("utf-8", "surrogateescape"))
    os.symlink(outside, root / "a" / "out")
    before = snapshot(root)
    before_outside = snapshot(outside)
    settings = UploadsSettings(root=root)

    outcome = run_cleanup(settings, layout["plans"], confirm=True)

    removal = outcome.removal
    assert removal.acted == 3
    assert removal.acted_bytes == sum(
        len(r.encode("utf-8", "surrogateescape")) for r in ("a/b/old1", "a/old2", odd)
    )
    assert sorted(os.listdir(root / "a")) == ["b", "out"]
    assert (root / "new" / "keepme").exists()
    quarantined = Path(removal.quarantine_run) / "files"
    assert quarantined.parent.parent == (layout["tmp"] / ".uploads-quarantine").resolve()
    assert (quarantined / "a" / "b" / "old1").read_bytes() == b"a/b/old1"
    assert os.path.exists(os.fsencode(quarantined) + b"/bin\xff\xfe name\n.dat")
    assert snapshot(outside) == before_outside
    manifest = [json.loads(line) for line in Path(removal.manifest_path).read_text().splitlines()]
    assert len(manifest) == 3
    assert any("path_b64" in item for item in manifest)

    restored = uploads.restore_quarantine_run(
        uploads.check_root(settings).path, Path(removal.quarantine_run).parent, removal.run_id, confirm=True
    )
    assert (restored.restored, restored.already_restored, restored.conflicts) == (3, 0, [])
    assert snapshot(root) == before
    again = uploads.restore_quarantine_run(
        root.resolve(), Path(removal.quarantine_run).parent, removal.run_id, confirm=True
    )
    assert (again.restored, again.already_restored) == (0, 3)
    assert snapshot(root) == before


def test_restore_never_overwrites_a_path_taken_again(layout: dict[str, Path]) -> None:
    root = layout["root"]
    put(root / "doc.pdf", 60, b"old version")
    outcome = run_cleanup(UploadsSettings(root=root), layout["plans"], confirm=True)
    put(root / "doc.pdf", 0, b"new upload with the same name")
    record = uploads.restore_quarantine_run(
        root.resolve(), Path(outcome.removal.quarantine_run).parent, outcome.removal.run_id, confirm=True
    )
    assert record.conflicts == ["doc.pdf"]
    assert record.restored == 0
    assert (root / "doc.pdf").read_bytes() == b"new upload with the same name"
    assert (Path(outcome.removal.quarantine_run) / "files" / "doc.pdf").read_bytes() == b"old version"


def test_restore_of_unknown_run_fails_with_the_runs_that_exist(layout: dict[str, Path]) -> None:
    with pytest.raises(ParameterError):
        uploads.restore_quarantine_run(layout["root"], layout["tmp"], "../../etc", confirm=True)
    with pytest.raises(uploads.QuarantineRunNotFound, match="newest runs there: none"):
        uploads.restore_quarantine_run(layout["root"], layout["tmp"], "20260101T000000Z-abcdef", confirm=True)


def test_delete_mode_removes_exactly_the_plan(layout: dict[str, Path]) -> None:
    root = layout["root"]
    put(root / "x" / "old", 31)
    put(root / "x" / "young", 29)
    put(root / "keep" / "old", 300)
    outcome = run_cleanup(UploadsSettings(root=root), layout["plans"], confirm=True, mode="delete")
    assert outcome.removal.acted == 1
    assert not (root / "x" / "old").exists()
    assert (root / "x" / "young").exists()
    assert (root / "keep" / "old").exists()
    assert not (layout["tmp"] / ".uploads-quarantine").exists()
    # Running again changes nothing.
    second = run_cleanup(UploadsSettings(root=root), layout["plans"], confirm=True, mode="delete")
    assert (second.plan.stats.planned, second.removal.acted) == (0, 0)


def test_files_changed_between_plan_and_apply_are_kept_and_reported(layout: dict[str, Path]) -> None:
    root, outside = layout["root"], layout["outside"]
    for name in ("touched", "replaced", "now-link", "gone", "untouched"):
        put(root / "d" / name, 60, name.encode())
    put(root / "swapdir" / "victim", 60, b"inside")
    put(outside / "victim", 90, b"outside twin")
    settings = UploadsSettings(root=root)
    dry = run_cleanup(settings, layout["plans"], confirm=False)
    assert dry.plan.stats.planned == 6

    os.utime(root / "d" / "touched")  # modified now
    (root / "d" / "replaced").unlink()
    put(root / "d" / "replaced", 60, b"a different file with the old name and age")
    (root / "d" / "now-link").unlink()
    os.symlink(outside / "secret.txt", root / "d" / "now-link")
    (root / "d" / "gone").unlink()
    # The directory itself is swapped for a symlink to a directory outside holding the same name.
    os.rename(root / "swapdir", layout["tmp"] / "swapdir-moved")
    os.symlink(outside, root / "swapdir")
    before_outside = snapshot(outside)

    applied = run_cleanup(
        settings, layout["plans"], confirm=True, mode="delete", from_plan=Path(dry.plan.plan_path)
    )

    removal = applied.removal
    assert removal.acted == 1
    assert not (root / "d" / "untouched").exists()
    assert removal.kept_changed == 5
    reasons = dict(removal.changed)
    assert "modified since the plan" in reasons["d/touched"]
    assert "differs" in reasons["d/replaced"]
    assert "no longer a regular file" in reasons["d/now-link"]
    assert reasons["d/gone"] == "gone"
    assert "symlink" in reasons["swapdir/victim"]
    assert (root / "d" / "touched").exists()
    assert (root / "d" / "replaced").read_bytes() == b"a different file with the old name and age"
    assert os.path.islink(root / "d" / "now-link")
    assert snapshot(outside) == before_outside


def test_tampered_plan_is_refused_before_anything_is_touched(layout: dict[str, Path]) -> None:
    root = layout["root"]
    put(root / "a", 60)
    plan = layout["tmp"] / "evil.jsonl"
    info = os.stat(root / "a")
    good = FileEntry("a", 4, info.st_mtime_ns, info.st_dev, info.st_ino, info.st_ctime_ns).to_json_line()
    # More good lines than one batch, so a late bad line would come after files were acted on.
    evil = FileEntry("../outside/secret.txt", 4, int((NOW - 90 * DAY) * 1e9), 1, 1, 1).to_json_line()
    plan.write_text(good * (uploads.REFERENCE_BATCH + 1) + evil)
    with pytest.raises(PlanInvalid, match="outside the root"):
        run_cleanup(UploadsSettings(root=root), layout["plans"], confirm=True, mode="delete", from_plan=plan)
    assert (root / "a").exists()
    assert (layout["outside"] / "secret.txt").exists()


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "", "a/\x00"])
def test_plan_records_that_could_leave_the_root_are_invalid(rel: str) -> None:
    line = json.dumps({"path": rel, "size": 1, "mtime": 1.0, "dev": 1, "ino": 1, "ctime_ns": 1})
    with pytest.raises(PlanInvalid):
        FileEntry.from_json_line(line)


def test_plan_records_round_trip_any_name() -> None:
    for raw in (
        b"plain.txt",
        b"sp ace/new\nline",
        b"\xff\xfe/\x80bytes",
        "ünïcødé/名前".encode(),
        b'q"uo\\te',
    ):
        entry = FileEntry(os.fsdecode(raw), 12, 1_700_000_000_123_456_001, 2049, 42, 1_700_000_000_123_456_7)
        line = entry.to_json_line()
        assert line.endswith("\n")
        assert line.count("\n") == 1
        line.encode("ascii")  # plain ASCII JSON, whatever the name
        back = FileEntry.from_json_line(line)
        assert back == entry
        assert os.fsencode(back.rel) == raw


def test_plan_records_with_float_seconds_still_read() -> None:
    line = '{"path": "a/b", "size": 3, "mtime": 1700000000.25, "dev": 1, "ino": 2, "ctime_ns": 5}'
    entry = FileEntry.from_json_line(line)
    assert entry == FileEntry("a/b", 3, 1_700_000_000_250_000_000, 1, 2, 5)
    assert entry.mtime == 1_700_000_000.25


def test_protect_patterns() -> None:
    matcher = ProtectMatcher([".gitkeep", "keep/**", "*.lock", "avatars/*.png", "**/cache/**"])
    protected = [".gitkeep", "a/b/.gitkeep", "keep/x", "keep/a/b", "x.lock", "d/y.lock", "avatars/me.png"]
    protected += ["cache/a", "a/cache/b/c"]
    for rel in protected:
        assert matcher.matches(rel), rel
    for rel in ["keep", "keeper/x", "a/keep/x", "avatars/a/me.png", "avatars/me.jpg", "gitkeep", "a/b"]:
        assert not matcher.matches(rel), rel
    assert not ProtectMatcher([]).matches("anything")


def test_another_filesystem_below_the_root_is_not_entered(layout: dict[str, Path]) -> None:
    root = layout["root"]
    mount = root / "mnt"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        put(mount / "old-on-other-fs", 90)
        put(root / "old-here", 90)
        outcome = run_cleanup(UploadsSettings(root=root), layout["plans"], confirm=True, mode="delete")
        assert outcome.plan.stats.skipped_other_fs == 1
        assert (mount / "old-on-other-fs").exists()
        assert not (root / "old-here").exists()
        crossing = UploadsSettings(root=root, cross_filesystem=True)
        outcome = run_cleanup(crossing, layout["plans"], confirm=True, mode="delete")
        assert not (mount / "old-on-other-fs").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_quarantine_must_be_on_the_roots_filesystem_and_outside_it(layout: dict[str, Path]) -> None:
    root = layout["root"]
    check = uploads.check_root(UploadsSettings(root=root))
    with pytest.raises(QuarantineInvalid, match="overlaps"):
        uploads.prepare_quarantine(UploadsSettings(root=root, quarantine_dir=root / "q"), check, create=False)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != check.dev:
        other = UploadsSettings(root=root, quarantine_dir=shm / "uploads-quarantine-test-never-created")
        with pytest.raises(QuarantineInvalid, match="another filesystem"):
            uploads.prepare_quarantine(other, check, create=False)
        assert not (shm / "uploads-quarantine-test-never-created").exists()
    quarantine = uploads.prepare_quarantine(UploadsSettings(root=root), check, create=False)
    assert quarantine == layout["tmp"].resolve() / ".uploads-quarantine"
    assert not quarantine.exists()


def test_purge_removes_only_runs_past_retention(layout: dict[str, Path]) -> None:
    quarantine = layout["tmp"] / "q"
    now = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
    old = uploads.new_run_id(now - timedelta(days=20), "aaaaaa")
    recent = uploads.new_run_id(now - timedelta(days=3), "bbbbbb")
    for run in (old, recent):
        put(quarantine / run / "files" / "f", 60, b"12345")
        (quarantine / run / "manifest.jsonl").write_text(FileEntry("f", 5, 1.0, 1, 1, 1).to_json_line())
    put(quarantine / "not-a-run" / "x", 400)
    os.symlink(layout["outside"], quarantine / uploads.new_run_id(now - timedelta(days=90), "cccccc"))

    listed = uploads.purge_quarantine(quarantine, retention_days=14, now=now, confirm=False)
    assert (listed.runs, listed.files, listed.bytes) == ([old], 1, 5)
    assert (quarantine / old).exists()
    purged = uploads.purge_quarantine(quarantine, retention_days=14, now=now, confirm=True)
    assert purged.runs == [old]
    assert not (quarantine / old).exists()
    assert (quarantine / recent / "files" / "f").exists()
    assert (quarantine / "not-a-run" / "x").exists()
    assert (layout["outside"] / "secret.txt").exists()


def test_root_owner_and_mode_check(layout: dict[str, Path]) -> None:
    root = layout["root"]
    root.chmod(0o750)
    ok = uploads.check_root(UploadsSettings(root=root, expected_owner="root", expected_mode="0750"))
    assert ok.ok
    assert (ok.owner, ok.mode) == ("root", "0750")
    # Another owner than expected is refused (tests/unit/test_uploads_guard.py); a mode is reported.
    with pytest.raises(uploads.UploadsRootRefused, match="chown nobody"):
        uploads.check_root(UploadsSettings(root=root, expected_owner="nobody", expected_mode="0755"))
    bad = uploads.check_root(UploadsSettings(root=root, expected_owner="root", expected_mode="0755"))
    assert len(bad.problems) == 1
    assert "chmod 0755" in bad.problems[0]
    with pytest.raises(uploads.UploadsRootInvalid):
        uploads.check_root(UploadsSettings(root=layout["tmp"] / "missing"))


def test_plan_directory_and_run_ids(tmp_path: Path) -> None:
    settings = UploadsSettings(root=tmp_path)
    assert (
        uploads.plan_directory(settings, StorageSettings(url=f"file://{tmp_path}/b"))
        == tmp_path / "b" / "uploads-plans"
    )
    # With S3 storage, plans stay under the absolute state directory, whatever the working directory.
    s3 = StorageSettings(url="s3://bucket/x")
    assert uploads.plan_directory(settings, s3) == DEFAULT_STATE_DIR / "uploads-plans"
    assert uploads.plan_directory(settings, s3, tmp_path / "state") == tmp_path / "state" / "uploads-plans"
    assert (
        uploads.plan_directory(UploadsSettings(plan_dir=tmp_path / "p"), StorageSettings()) == tmp_path / "p"
    )
    run_id = uploads.new_run_id(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "0123abcd")
    assert run_id == "20260102T030405Z-0123abcd"
    assert uploads.run_id_time(run_id) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
