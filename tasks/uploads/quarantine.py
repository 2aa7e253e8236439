"""Quarantine: its preflight, retention (purge) and restore of one run."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tasks.errors import ParameterError
from tasks.settings import UploadsSettings
from tasks.uploads.errors import PlanInvalid, QuarantineInvalid, QuarantineRunNotFound
from tasks.uploads.guard import RootCheck, refuse_location
from tasks.uploads.locations import RUN_ID_PATTERN, _inside, quarantine_directory, run_id_time
from tasks.uploads.records import ErrorLog, FileEntry, display_path, read_jsonl
from tasks.uploads.remove import _Changed, _DirChain, _open_dir


def prepare_quarantine(settings: UploadsSettings, root: RootCheck, *, create: bool) -> Path:
    """Check (and with ``create``, make) the quarantine directory: outside the root, same filesystem.

    Raises:
        QuarantineInvalid: it is inside the root (or holds it), or lives on another filesystem, so a
            move would be a copy that can fail half way.
    """
    quarantine = quarantine_directory(settings, root.path)
    if _inside(quarantine, root.path) or _inside(root.path, quarantine):
        raise QuarantineInvalid(
            f"quarantine {quarantine} overlaps the uploads root {root.path}; set uploads.quarantine_dir"
            " to a directory beside the root"
        )
    if create:
        try:
            quarantine.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise QuarantineInvalid(
                f"cannot create quarantine {quarantine} ({exc.strerror}); set uploads.quarantine_dir"
            ) from None
    existing = quarantine
    while not existing.exists():
        existing = existing.parent
    st = os.stat(existing)
    if not stat.S_ISDIR(st.st_mode):
        raise QuarantineInvalid(f"quarantine {quarantine} is not a directory; set uploads.quarantine_dir")
    if st.st_dev != root.dev:
        raise QuarantineInvalid(
            f"quarantine {quarantine} is on another filesystem than {root.path}; set"
            " uploads.quarantine_dir to a directory on the same filesystem, or use mode='delete'"
        )
    return quarantine


@dataclass
class PurgeRecord:
    """The change record of :func:`purge_quarantine`."""

    quarantine: str
    confirmed: bool
    retention_days: int
    runs: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    errors: ErrorLog = field(default_factory=ErrorLog)


def purge_quarantine(
    quarantine: Path,
    *,
    retention_days: int,
    now: datetime | None = None,
    confirm: bool = False,
    current_run: str | None = None,
) -> PurgeRecord:
    """Remove quarantine runs older than ``retention_days``; without ``confirm`` only list them.

    Only directories named like a run id are considered; removal does not follow symlinks
    (``shutil.rmtree`` works through descriptors on Linux). The run ``current_run`` is never purged,
    whatever its age: its report tells how to restore it.

    Raises:
        ParameterError: ``retention_days`` below 1, which would purge what was just quarantined.
    """
    if retention_days < 1:
        raise ParameterError(
            f"quarantine retention must be at least 1 day, not {retention_days}: a shorter one would"
            " purge what a run just quarantined; set uploads.quarantine_retention_days"
        )
    now = now or datetime.now(UTC)
    record = PurgeRecord(quarantine=str(quarantine), confirmed=confirm, retention_days=retention_days)
    if not quarantine.is_dir():
        return record
    for entry in sorted(os.scandir(quarantine), key=lambda e: e.name):
        if not RUN_ID_PATTERN.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.name == current_run:
            continue
        if (now - run_id_time(entry.name)).total_seconds() < retention_days * 86400:
            continue
        manifest = Path(entry.path) / "manifest.jsonl"
        with contextlib.suppress(PlanInvalid):
            for item in read_jsonl(manifest) if manifest.is_file() else ():
                record.files += 1
                record.bytes += item.size
        record.runs.append(entry.name)
        if confirm:
            try:
                shutil.rmtree(entry.path)
            except OSError as exc:
                record.errors.add(entry.name, "purge", exc)
    return record


@dataclass
class RestoreRecord:
    """The change record of :func:`restore_quarantine_run`."""

    run_id: str
    confirmed: bool
    restored: int = 0
    restored_bytes: int = 0
    already_restored: int = 0
    conflicts: list[str] = field(default_factory=list)
    errors: ErrorLog = field(default_factory=ErrorLog)


def restore_quarantine_run(
    root: Path, quarantine: Path, run_id: str, *, confirm: bool = False, cross_filesystem: bool = False
) -> RestoreRecord:
    """Move the files of quarantine run ``run_id`` back to where they were under the root.

    A file whose original path is taken again is left in quarantine and reported as a conflict; a
    file no longer in quarantine counts as already restored, so a second run changes nothing.
    Missing directories are recreated (mode 0755 before umask).

    Raises:
        ParameterError: ``run_id`` is not a run id.
        QuarantineRunNotFound: no such run in the quarantine.
        UploadsRootRefused: ``root`` is a system, home or project directory (:func:`location_refusal`).
    """
    run_id_time(run_id)
    refuse_location(root)
    run_dir = quarantine / run_id
    manifest = run_dir / "manifest.jsonl"
    if not manifest.is_file():
        recent = ", ".join(latest_quarantine_runs(quarantine, 5)) or "none"
        raise QuarantineRunNotFound(
            f"no quarantine run {run_id} in {quarantine} (no manifest); the newest runs there: {recent}"
        )
    record = RestoreRecord(run_id=run_id, confirmed=confirm)
    with contextlib.ExitStack() as stack:
        root_fd = _open_dir(root)
        stack.callback(os.close, root_fd)
        files_fd = _open_dir(run_dir / "files")
        stack.callback(os.close, files_fd)
        sources = _DirChain(files_fd, os.fstat(files_fd).st_dev, cross_filesystem=False)
        stack.callback(sources.close)
        targets = _DirChain(
            root_fd,
            os.fstat(root_fd).st_dev,
            cross_filesystem=cross_filesystem,
            create_mode=0o755 if confirm else None,
        )
        stack.callback(targets.close)
        for entry in read_jsonl(manifest):
            try:
                _restore_entry(entry, record, sources, targets, confirm=confirm)
            except _Changed as why:
                record.errors.add(entry.rel, "restore", str(why))
            except OSError as exc:
                record.errors.add(entry.rel, "restore", exc)
    return record


def _restore_entry(
    entry: FileEntry, record: RestoreRecord, sources: _DirChain, targets: _DirChain, *, confirm: bool
) -> None:
    """Move one manifest entry back (or, without ``confirm``, count it), recording what happened.

    Raises:
        _Changed: a directory on the way back was replaced (with ``confirm``; a dry run counts on).
        OSError: from the moves and lookups; the caller records it.
    """
    parent, _, name = entry.rel.rpartition("/")
    source_fd = sources.open(parent)
    try:
        st = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
    except FileNotFoundError:
        record.already_restored += 1
        return
    if not stat.S_ISREG(st.st_mode):
        record.errors.add(entry.rel, "restore", "not a regular file in quarantine; left there")
        return
    try:
        target_fd = targets.open(parent)
    except _Changed:
        if confirm:
            raise
        target_fd = -1  # a dry run: the directory would be recreated
    if target_fd != -1:
        try:
            os.stat(name, dir_fd=target_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            record.conflicts.append(display_path(entry.rel))
            return
    if confirm:
        os.rename(name, name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
    record.restored += 1
    record.restored_bytes += st.st_size


def latest_quarantine_runs(quarantine: Path, limit: int = 10) -> list[str]:
    """The newest quarantine run ids, newest first (for messages and reports)."""
    if not quarantine.is_dir():
        return []
    names = [e.name for e in os.scandir(quarantine) if RUN_ID_PATTERN.match(e.name)]
    return sorted(names, reverse=True)[:limit]
