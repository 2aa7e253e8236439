"""The uploads cleanup's deleting helper: a small process that re-checks and unlinks planned files.

The delete mode of a cleanup without a reference query plans and deletes in one pass. The scan stays
in the flow's process; each directory's planned files, once written to the plan, are handed to this
process with the directory's descriptor (``SCM_RIGHTS`` over a ``SOCK_SEQPACKET`` socket pair). Its
re-checks and unlinks then run on the other core while the scan lists the next directories, instead
of after them (a thread cannot do this: the GIL hand-off on every system call costs more than it
saves).

It imports nothing beyond the standard library (it starts with ``python -I -S`` in a few
milliseconds) and acts only through the descriptors it is given: each name is looked at with
``lstat`` relative to its directory's descriptor (still a regular file, same device, inode and inode
change time, mtime still before the cutoff) and unlinked relative to the same descriptor.

Protocol, one message per ``sendmsg``:

- ``D`` + the directory's path relative to the root (``surrogateescape`` UTF-8), carrying its
  descriptor: the following ``F`` messages are files of that directory;
- ``F`` + ``marshal`` of ``[(name, dev, ino, ctime_ns, size), ...]``;
- ``E``: no more files; the helper answers with ``marshal`` of its result and exits.

The result is ``(acted, acted_bytes, kept_changed, changed, errors_count, errors)``; ``changed`` and
``errors`` hold at most ``MAX_RECORDED`` ``(relative path, reason)`` pairs.
"""

from __future__ import annotations

import marshal
import os
import socket
import stat
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

MAX_MESSAGE = 1 << 17
MAX_RECORDED = 200


def change_reason(st: os.stat_result, dev: int, ino: int, ctime_ns: int, cutoff: float) -> str | None:
    """Why the file now seen as ``st`` is not the planned one (None: it is, and still old)."""
    if not stat.S_ISREG(st.st_mode):
        return "no longer a regular file"
    if st.st_ino != ino or st.st_dev != dev:
        return "replaced by another file (inode differs)"
    if st.st_mtime >= cutoff:
        stamp = datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"modified since the plan ({stamp})"
    if st.st_ctime_ns != ctime_ns:
        # Same inode number but a new inode change time: rewritten, chmod-ed, or a new file that
        # reused a freed inode number (ext4 does) with an old mtime copied onto it.
        return "changed since the plan (inode change time differs)"
    return None


class Tally:
    """What :func:`remove_files` did: counts, and the first ``MAX_RECORDED`` problems by path."""

    __slots__ = ("acted", "acted_bytes", "changed", "errors", "errors_count", "kept_changed")

    def __init__(self) -> None:
        self.acted = self.acted_bytes = self.kept_changed = self.errors_count = 0
        self.changed: list[tuple[str, str]] = []
        self.errors: list[tuple[str, str]] = []

    def as_tuple(self) -> tuple[int, int, int, list[tuple[str, str]], int, list[tuple[str, str]]]:
        return self.acted, self.acted_bytes, self.kept_changed, self.changed, self.errors_count, self.errors


def remove_files(
    dir_fd: int, prefix: str, files: Iterable[tuple[str, int, int, int, int]], cutoff: float, tally: Tally
) -> None:
    """Re-check and unlink ``(name, dev, ino, ctime_ns, size)`` files of the directory ``dir_fd``.

    A file that is gone, no longer a regular file, another inode, changed (inode change time) or
    modified at or after ``cutoff`` is kept and counted as changed; an error (permission denied) is
    counted and recorded, not raised.
    """
    lstat_at, unlink_at, s_isreg = os.stat, os.unlink, stat.S_ISREG
    changed, errors = tally.changed, tally.errors
    acted = acted_bytes = kept_changed = errors_count = 0
    try:
        for name, dev, ino, ctime_ns, size in files:
            try:
                now = lstat_at(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                reason = "gone"
            except OSError as exc:
                errors_count += 1
                if len(errors) < MAX_RECORDED:
                    errors.append((prefix + name, exc.strerror or str(exc)))
                continue
            else:
                if (
                    now.st_ino == ino
                    and now.st_ctime_ns == ctime_ns
                    and now.st_dev == dev
                    and now.st_mtime < cutoff
                    and s_isreg(now.st_mode)
                ):
                    try:
                        unlink_at(name, dir_fd=dir_fd)
                    except OSError as exc:
                        errors_count += 1
                        if len(errors) < MAX_RECORDED:
                            errors.append((prefix + name, exc.strerror or str(exc)))
                        continue
                    acted += 1
                    acted_bytes += size
                    continue
                reason = change_reason(now, dev, ino, ctime_ns, cutoff) or "changed since the plan"
            kept_changed += 1
            if len(changed) < MAX_RECORDED:
                changed.append((prefix + name, reason))
    finally:
        tally.acted += acted
        tally.acted_bytes += acted_bytes
        tally.kept_changed += kept_changed
        tally.errors_count += errors_count


def serve(sock: socket.socket, cutoff: float) -> Tally:
    """Handle messages until ``E`` (or the peer goes away); return what was done."""
    tally = Tally()
    dir_fd, prefix = -1, ""
    try:
        while True:
            message, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
            if flags & socket.MSG_TRUNC or flags & socket.MSG_CTRUNC:
                raise RuntimeError("a message from the cleanup was truncated")
            if not message or message == b"E":
                break
            kind = message[:1]
            if kind == b"D":
                if dir_fd != -1:
                    os.close(dir_fd)
                    dir_fd = -1
                if len(fds) != 1:
                    raise RuntimeError("a directory message came without its descriptor")
                dir_fd = fds[0]
                prefix = message[1:].decode("utf-8", "surrogateescape")
                continue
            for fd in fds:
                os.close(fd)
            if kind != b"F" or dir_fd == -1:
                raise RuntimeError(f"unexpected message {message[:1]!r} from the cleanup")
            # The peer is the cleanup that started this process, over a private socket pair.
            remove_files(dir_fd, prefix, marshal.loads(message[1:]), cutoff, tally)  # noqa: S302
    finally:
        if dir_fd != -1:
            os.close(dir_fd)
    return tally


def main(argv: list[str]) -> int:
    cutoff, fd = float(argv[1]), int(argv[2])
    with socket.socket(fileno=fd) as sock:
        payload = marshal.dumps(serve(sock, cutoff).as_tuple())
        # The answer can exceed one message: its length first, then slices.
        sock.sendall(len(payload).to_bytes(8, "big"))
        for offset in range(0, len(payload), MAX_MESSAGE):
            sock.sendall(payload[offset : offset + MAX_MESSAGE])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
