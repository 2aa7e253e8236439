"""The one confirm-gated function that removes uploads, and the descriptor-relative directory chains
it (and restore) acts through."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tasks import unlink_helper
from tasks.errors import ParameterError
from tasks.runlog import run_logger
from tasks.settings import PostgresSettings, UploadsSettings
from tasks.uploads.errors import QuarantineInvalid
from tasks.uploads.guard import refuse_location
from tasks.uploads.locations import run_id_time
from tasks.uploads.records import (
    _DIR_FLAGS,
    MAX_RECORDED_ERRORS,
    ErrorLog,
    FileEntry,
    Mode,
    display_path,
    read_jsonl,
)
from tasks.uploads.references import REFERENCE_BATCH, ReferenceChecker, _batches, reference_checker


class _Changed(Exception):
    """A file or one of its directories is no longer what the plan saw."""


class _DirChain:
    """Descriptors of the directories from a base down to the current one, opened without following
    symlinks, reused while consecutive paths share a prefix (plans come in scan order)."""

    def __init__(
        self, base_fd: int, base_dev: int, *, cross_filesystem: bool, create_mode: int | None = None
    ):
        self.base_fd = base_fd
        self.base_dev = base_dev
        self.cross_filesystem = cross_filesystem
        self.create_mode = create_mode
        self.key: str | None = ""
        self.parts: list[str] = []
        self.fds: list[int] = []

    def open(self, parent: str) -> int:
        """The descriptor of directory ``parent`` (relative to the base, '' for the base itself).

        Raises:
            _Changed: a component is gone, a symlink, not a directory, or on another filesystem.
            OSError: permission denied and other errors.
        """
        if parent == self.key:
            return self.fds[-1] if self.fds else self.base_fd
        parts = parent.split("/") if parent else []
        keep = 0
        while keep < len(self.parts) and keep < len(parts) and self.parts[keep] == parts[keep]:
            keep += 1
        self._truncate(keep)
        self.key = None
        current = self.fds[-1] if self.fds else self.base_fd
        for part in parts[keep:]:
            if self.create_mode is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, self.create_mode, dir_fd=current)
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=current)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    raise _Changed(
                        f"directory {part!r} is gone or was replaced by a symlink or file"
                    ) from None
                raise
            if not self.cross_filesystem and os.fstat(fd).st_dev != self.base_dev:
                os.close(fd)
                raise _Changed(f"directory {part!r} is now on another filesystem")
            self.parts.append(part)
            self.fds.append(fd)
            current = fd
        self.key = parent
        return current

    def _truncate(self, keep: int) -> None:
        for fd in self.fds[keep:]:
            os.close(fd)
        del self.fds[keep:]
        del self.parts[keep:]

    def close(self) -> None:
        self._truncate(0)
        self.key = ""


def _open_dir(path: Path) -> int:
    return os.open(path, _DIR_FLAGS & ~os.O_NOFOLLOW)


@dataclass
class RemovalRecord:
    """The change record of :func:`remove_planned`."""

    run_id: str
    mode: Mode
    confirmed: bool
    root: str
    planned: int = 0
    acted: int = 0
    acted_bytes: int = 0
    kept_changed: int = 0
    kept_referenced: int = 0
    changed: list[tuple[str, str]] = field(default_factory=list)
    errors: ErrorLog = field(default_factory=ErrorLog)
    quarantine_run: str | None = None
    manifest_path: str | None = None

    @property
    def verb(self) -> str:
        action = "quarantined" if self.mode == "quarantine" else "deleted"
        return action if self.confirmed else f"would be {action}"


_change_reason = unlink_helper.change_reason


def _recheck(parent_fd: int, name: str, entry: FileEntry, cutoff: float) -> os.stat_result:
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise _Changed("gone") from None
    reason = _change_reason(st, entry.dev, entry.ino, entry.ctime_ns, cutoff)
    if reason is not None:
        raise _Changed(reason)
    return st


def _check_removal_arguments(mode: str, quarantine: Path | None, run_id: str) -> None:
    if mode not in ("quarantine", "delete"):
        raise ParameterError(f"mode must be 'quarantine' or 'delete', not {mode!r}")
    if mode == "quarantine" and quarantine is None:
        raise ParameterError("quarantine mode needs the quarantine directory (prepare_quarantine)")
    run_id_time(run_id)


def remove_planned(
    uploads: UploadsSettings,
    pg: PostgresSettings | None,
    plan: Path | Iterable[FileEntry],
    *,
    root: Path,
    mode: Mode,
    cutoff: float,
    run_id: str,
    confirm: bool = False,
    quarantine: Path | None = None,
    references: ReferenceChecker | None = None,
    batch_size: int = REFERENCE_BATCH,
    on_progress: Callable[[int], None] | None = None,
) -> RemovalRecord:
    """Quarantine or delete the planned files; without ``confirm`` only count them (a dry run).

    Right before acting, each batch is checked against the database again and each file through
    descriptors: still a regular file, same device, inode and inode change time, still older than
    ``cutoff``. A file
    that changed is kept and reported. Operations are relative to directory descriptors opened with
    ``O_NOFOLLOW``, so a symlink swapped in after the plan never redirects one outside the root.
    Per-file errors (permission denied) are recorded, not raised.

    Args:
        uploads: the uploads settings (reference query, cross_filesystem).
        pg: the application's database, for the reference re-check.
        plan: a plan file (JSON Lines, see :class:`PlanWriter`), or the plan's entries as they stream.
        root: the resolved uploads root (:func:`check_root`).
        mode: ``quarantine`` (rename into ``quarantine/<run_id>/files``) or ``delete``.
        cutoff: files modified at or after this time are kept.
        run_id: the run's id; names the quarantine run.
        confirm: act; without it nothing changes on disk.
        quarantine: the prepared quarantine directory (:func:`prepare_quarantine`), for that mode.
        references: an open reference checker; None opens one when ``uploads.reference_query`` is set.
        on_progress: called with the number of planned files handled so far, after each batch.

    Returns:
        The change record: counts, what changed since the plan, errors, the quarantine manifest.

    Raises:
        ParameterError: quarantine mode without a quarantine directory.
        ReferenceCheckFailed: the database re-check failed; files of that batch were not touched.
        UploadsRootRefused: ``root`` is a system, home or project directory (:func:`location_refusal`).
    """
    _check_removal_arguments(mode, quarantine, run_id)
    refuse_location(root)
    record = RemovalRecord(run_id=run_id, mode=mode, confirmed=confirm, root=str(root))
    entries = read_jsonl(plan) if isinstance(plan, Path) else iter(plan)
    if not confirm:
        return _count_planned(entries, record, batch_size, on_progress)
    with contextlib.ExitStack() as stack:
        root_fd = _open_dir(root)
        stack.callback(os.close, root_fd)
        root_dev = os.fstat(root_fd).st_dev
        sources = _DirChain(root_fd, root_dev, cross_filesystem=uploads.cross_filesystem)
        stack.callback(sources.close)
        targets: _DirChain | None = None
        manifest: IO[str] | None = None
        if mode == "quarantine":
            assert quarantine is not None
            targets, manifest = _open_quarantine_run(stack, quarantine, run_id, root, root_dev, record)
        if references is None:
            references = stack.enter_context(reference_checker(uploads, pg))
        for batch in _batches(entries, batch_size):
            record.planned += len(batch)
            # Asked again right before acting: a file referenced since the plan stays.
            referenced = references.referenced(e.rel for e in batch) if references else set()
            for entry in batch:
                if entry.rel in referenced:
                    record.kept_referenced += 1
                    continue
                _act_on(entry, record, sources, targets, manifest, cutoff=cutoff)
            if manifest is not None:
                manifest.flush()
            if on_progress is not None:
                on_progress(record.planned)
    run_logger(__name__).info(
        "uploads %s: %d of %d planned files %s, %d changed since the plan, %d referenced now, %d errors",
        run_id,
        record.acted,
        record.planned,
        record.verb,
        record.kept_changed,
        record.kept_referenced,
        record.errors.count,
    )
    return record


def _count_planned(
    entries: Iterator[FileEntry],
    record: RemovalRecord,
    batch_size: int,
    on_progress: Callable[[int], None] | None,
) -> RemovalRecord:
    """A dry run changes nothing, so there is nothing to re-check: count what would go."""
    count = nbytes = 0
    for entry in entries:
        count += 1
        nbytes += entry[1]
        if on_progress is not None and count % batch_size == 0:
            on_progress(count)
    record.planned = record.acted = count
    record.acted_bytes = nbytes
    return record


def _open_quarantine_run(
    stack: contextlib.ExitStack,
    quarantine: Path,
    run_id: str,
    root: Path,
    root_dev: int,
    record: RemovalRecord,
) -> tuple[_DirChain, IO[str]]:
    """Create ``<quarantine>/<run_id>/files`` and open its directory chain and the run's manifest
    (closed by ``stack``); the record names the run and its manifest.

    Raises:
        QuarantineInvalid: the run's directory is on another filesystem than the root (a move would
            be a copy).
    """
    run_dir = quarantine / run_id
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_fd = _open_dir(run_dir)
    stack.callback(os.close, run_fd)
    with contextlib.suppress(FileExistsError):
        os.mkdir("files", 0o700, dir_fd=run_fd)
    files_fd = os.open("files", _DIR_FLAGS, dir_fd=run_fd)
    stack.callback(os.close, files_fd)
    if os.fstat(files_fd).st_dev != root_dev:
        raise QuarantineInvalid(f"quarantine {quarantine} is on another filesystem than {root}")
    targets = _DirChain(files_fd, root_dev, cross_filesystem=False, create_mode=0o700)
    stack.callback(targets.close)
    manifest = stack.enter_context((run_dir / "manifest.jsonl").open("a", encoding="utf-8"))
    record.quarantine_run = str(run_dir)
    record.manifest_path = str(run_dir / "manifest.jsonl")
    return targets, manifest


def _act_on(
    entry: FileEntry,
    record: RemovalRecord,
    sources: _DirChain,
    targets: _DirChain | None,
    manifest: IO[str] | None,
    *,
    cutoff: float,
) -> None:
    parent, _, name = entry.rel.rpartition("/")
    try:
        parent_fd = sources.open(parent)
        _recheck(parent_fd, name, entry, cutoff)
        if targets is None:
            os.unlink(name, dir_fd=parent_fd)
        else:
            target_fd = targets.open(parent)
            try:
                os.stat(name, dir_fd=target_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                record.errors.add(entry.rel, "quarantine", "already present in this run's quarantine; kept")
                return
            assert manifest is not None
            os.rename(name, name, src_dir_fd=parent_fd, dst_dir_fd=target_fd)
            moved = os.stat(name, dir_fd=target_fd, follow_symlinks=False)
            if moved.st_ino != entry.ino or not stat.S_ISREG(moved.st_mode):
                # Swapped in the instant between the re-check and the rename: put it back untouched.
                os.rename(name, name, src_dir_fd=target_fd, dst_dir_fd=parent_fd)
                raise _Changed("replaced during the move (moved back)")
            manifest.write(entry.to_json_line())
    except _Changed as why:
        record.kept_changed += 1
        if len(record.changed) < MAX_RECORDED_ERRORS:
            record.changed.append((display_path(entry.rel), str(why)))
        return
    except OSError as exc:
        record.errors.add(entry.rel, "quarantine" if targets is not None else "delete", exc)
        return
    record.acted += 1
    record.acted_bytes += entry.size
