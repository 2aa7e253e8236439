"""The scan: regular files older than the cutoff under the root, streamed, one directory at a time,
through descriptors opened without following symlinks."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tasks.uploads.errors import UploadsRootInvalid
from tasks.uploads.protect import ProtectMatcher
from tasks.uploads.records import _DIR_FLAGS, ErrorLog, FileEntry

# Each directory level holds one descriptor (two while it is listed): bounded far below RLIMIT_NOFILE.
MAX_DEPTH = 256


# Files of one directory handed on at a time by the scan: bounds memory in a flat directory.
FOUND_CHUNK = 512


@dataclass
class ScanStats:
    """What the scan and the plan saw. Bytes are apparent sizes (``st_size``)."""

    scanned_dirs: int = 0
    scanned_files: int = 0
    scanned_bytes: int = 0
    matched: int = 0
    matched_bytes: int = 0
    protected: int = 0
    protected_bytes: int = 0
    referenced: int = 0
    referenced_bytes: int = 0
    planned: int = 0
    planned_bytes: int = 0
    skipped_symlinks: int = 0
    skipped_special: int = 0
    skipped_other_fs: int = 0
    errors: ErrorLog = field(default_factory=ErrorLog)


def scan_old_files(
    root: Path,
    cutoff: float,
    stats: ScanStats,
    *,
    cross_filesystem: bool = False,
    protect: ProtectMatcher | None = None,
    max_depth: int = MAX_DEPTH,
) -> Iterator[FileEntry]:
    """Yield the regular files under ``root`` whose mtime is before ``cutoff``, streaming.

    Never follows a symlink, never leaves the root, stays on the root's filesystem unless
    ``cross_filesystem``. Old files that ``protect`` matches are counted in ``stats`` and not
    yielded. Unreadable directories and files are recorded in ``stats.errors`` and skipped.
    Counters in ``stats`` are complete once the generator is exhausted or closed.
    """
    new_entry = tuple.__new__  # FileEntry without the Python-level __new__: this runs per file
    for _fd, prefix, found in _walk_old_files(
        root, cutoff, stats, cross_filesystem=cross_filesystem, protect=protect, max_depth=max_depth
    ):
        for name, st in found:
            yield new_entry(
                FileEntry, (prefix + name, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns)
            )


def _walk_old_files(
    root: Path,
    cutoff: float,
    stats: ScanStats,
    *,
    cross_filesystem: bool = False,
    protect: ProtectMatcher | None = None,
    max_depth: int = MAX_DEPTH,
) -> Generator[tuple[int, str, list[tuple[str, os.stat_result]]], None, None]:
    """The scan of :func:`scan_old_files`, one directory at a time.

    Yields ``(dir_fd, prefix, found)`` per directory holding old unprotected regular files: the
    directory's descriptor (opened relative to its parent with ``O_NOFOLLOW``, on the root's
    filesystem; valid until the next item is requested, never to be closed by the caller), its path
    relative to the root ending in '/' ('' for the root), and ``(name, lstat result)`` of each file,
    at most ``FOUND_CHUNK`` of them (a larger directory comes as several items). One item per
    directory instead of one per file keeps the per-file cost to the loop body.
    """
    names = protect.names if protect is not None else frozenset()
    other = protect.other if protect is not None else None
    s_ifmt, s_ifreg, s_ifdir, s_iflnk = stat.S_IFMT(0o170000), stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
    try:
        root_fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise UploadsRootInvalid(
            f"cannot open the uploads root {root} ({exc.strerror}); run as a user that can read it"
        ) from None
    root_dev = os.fstat(root_fd).st_dev
    # Locals in the hot loop; written to ``stats`` in ``finally``.
    files = nbytes = matched = matched_bytes = dirs = links = special = other_fs = 0
    errors = stats.errors
    # Each frame: an open directory descriptor, its relative prefix, its depth, subdirectories left.
    stack: list[tuple[int, str, int, list[str]]] = []
    fd, prefix, depth = root_fd, "", 0
    try:
        while True:
            if fd != -1:
                dirs += 1
                subdirs: list[str] = []
                found: list[tuple[str, os.stat_result]] = []
                add_found = found.append
                covered = protect is not None and protect.covers_directory(prefix)
                try:
                    with os.scandir(fd) as listing:
                        for entry in listing:
                            # One lstat (fstatat relative to the directory) per entry, like find.
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue
                            except OSError as exc:
                                errors.add(prefix + entry.name, "stat", exc)
                                continue
                            kind = st.st_mode & s_ifmt
                            if kind != s_ifreg:
                                if kind == s_ifdir:
                                    subdirs.append(entry.name)
                                elif kind == s_iflnk:
                                    links += 1
                                else:
                                    special += 1
                                continue
                            files += 1
                            size = st.st_size
                            nbytes += size
                            if st.st_mtime < cutoff:
                                matched += 1
                                matched_bytes += size
                                name = entry.name
                                if (
                                    covered
                                    or name in names
                                    or (other is not None and other(prefix + name, name))
                                ):
                                    stats.protected += 1
                                    stats.protected_bytes += size
                                    continue
                                add_found((name, st))
                                if len(found) >= FOUND_CHUNK:
                                    # A flat directory of a million uploads must not be held whole.
                                    # Listing goes on after the consumer acted on these names:
                                    # getdents returns every entry not removed exactly once.
                                    yield fd, prefix, found
                                    found = []
                                    add_found = found.append
                except OSError as exc:
                    errors.add(prefix.rstrip("/"), "list directory", exc)
                if found:
                    yield fd, prefix, found
                subdirs.reverse()
                stack.append((fd, prefix, depth, subdirs))
                fd = -1
            if not stack:
                break
            parent_fd, parent_prefix, parent_depth, pending = stack[-1]
            if not pending:
                stack.pop()
                os.close(parent_fd)
                continue
            name = pending.pop()
            rel = parent_prefix + name
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    # Swapped for a symlink or a file since it was listed: not ours to enter.
                    links += 1
                else:
                    errors.add(rel, "open directory", exc)
                continue
            if not cross_filesystem and os.fstat(child).st_dev != root_dev:
                os.close(child)
                other_fs += 1
                continue
            if parent_depth + 1 > max_depth:
                os.close(child)
                errors.add(rel, "open directory", f"nested deeper than {max_depth} levels; not scanned")
                continue
            fd, prefix, depth = child, rel + "/", parent_depth + 1
    finally:
        for frame_fd, *_ in stack:
            os.close(frame_fd)
        if fd != -1:
            os.close(fd)
        stats.scanned_dirs += dirs
        stats.scanned_files += files
        stats.scanned_bytes += nbytes
        stats.matched += matched
        stats.matched_bytes += matched_bytes
        stats.skipped_symlinks += links
        stats.skipped_special += special
        stats.skipped_other_fs += other_fs
