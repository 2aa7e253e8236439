"""The one-pass delete of a run without a reference query: plan and delete per directory, the deletes
in a helper process (:mod:`tasks.unlink_helper`) given each directory's descriptor."""

from __future__ import annotations

import contextlib
import heapq
import marshal
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_string  # the C encoder json.dumps uses
from pathlib import Path

from tasks import unlink_helper
from tasks.runlog import run_logger
from tasks.settings import UploadsSettings
from tasks.uploads.errors import UploadsError
from tasks.uploads.plan import PlanWriter
from tasks.uploads.protect import ProtectMatcher
from tasks.uploads.records import MAX_RECORDED_ERRORS, FileEntry, Mode, display_path
from tasks.uploads.references import REFERENCE_BATCH
from tasks.uploads.remove import RemovalRecord
from tasks.uploads.scan import _walk_old_files


def _plan_and_delete(
    uploads: UploadsSettings,
    writer: PlanWriter,
    *,
    root: Path,
    cutoff: float,
    run_id: str,
    mode: Mode,
    confirm: bool,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = REFERENCE_BATCH,
) -> RemovalRecord:
    """The plan of a run without a database reference check, and with ``confirm`` in delete mode its
    removal, in one pass over the tree (the result equals :class:`PlanWriter` + :func:`remove_planned`).

    Each directory's old files are written to the plan first; then each is re-checked right before
    its unlink exactly as :func:`remove_planned` does: a fresh lstat of the name, relative to the
    descriptor the scan listed the directory through (opened with ``O_NOFOLLOW``, on the root's
    filesystem), must still show a regular file with the planned device, inode and inode change time
    and an mtime before the cutoff; the unlink is relative to the same directory (a duplicate of that
    descriptor, on the :class:`_Remover` thread, while the scan goes on).
    """
    record = RemovalRecord(run_id=run_id, mode=mode, confirmed=confirm, root=str(root))
    deleting = confirm and mode == "delete"
    stats = writer.stats
    largest, oldest, top_n = writer.largest, writer.oldest, writer.top_n
    push, replace = heapq.heappush, heapq.heapreplace
    new_entry = tuple.__new__  # FileEntry without the Python-level __new__
    planned = planned_bytes = reported = 0
    writer.path.parent.mkdir(parents=True, exist_ok=True)
    walk = _walk_old_files(
        root,
        cutoff,
        stats,
        cross_filesystem=uploads.cross_filesystem,
        protect=ProtectMatcher(uploads.protect),
    )
    # Re-checks and unlinks run on a worker thread: they are system calls that release the GIL, so
    # they overlap the scan of the next directories instead of following it.
    remover = _Remover(record, cutoff) if deleting else None
    try:
        with writer.partial.open("w", encoding="utf-8", buffering=1 << 20) as out, contextlib.closing(walk):
            for fd, prefix, found in walk:
                ascii_prefix = prefix.isascii()
                lines: list[str] = []
                add = lines.append
                for name, st in found:
                    size, mtime_ns = st.st_size, st.st_mtime_ns
                    rel = prefix + name
                    planned += 1
                    planned_bytes += size
                    entry = None
                    if ascii_prefix and name.isascii():
                        add(
                            f'{{"path":{_json_string(rel)},"size":{size},"mtime_ns":{mtime_ns},'
                            f'"dev":{st.st_dev},"ino":{st.st_ino},"ctime_ns":{st.st_ctime_ns}}}\n'
                        )
                    else:
                        entry = new_entry(
                            FileEntry, (rel, size, mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns)
                        )
                        add(entry.to_json_line())
                    # Heaps of (key, sequence, entry), smallest key on top; cheap reject first.
                    if len(largest) < top_n or size > largest[0][0]:
                        entry = entry or new_entry(
                            FileEntry, (rel, size, mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns)
                        )
                        (push if len(largest) < top_n else replace)(largest, (size, planned, entry))
                    if len(oldest) < top_n or -mtime_ns > oldest[0][0]:
                        entry = entry or new_entry(
                            FileEntry, (rel, size, mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns)
                        )
                        (push if len(oldest) < top_n else replace)(oldest, (-mtime_ns, planned, entry))
                # In the plan before any of these files is touched.
                out.write("".join(lines))
                if remover is not None:
                    remover.submit(fd, prefix, found)
                if on_progress is not None and planned - reported >= progress_every:
                    reported = planned
                    on_progress(planned)
        if remover is not None:
            remover.finish()
        writer.partial.replace(writer.path)
        writer.complete = True
    finally:
        if remover is not None:
            remover.abort()  # after an error: files not yet handled stay; a no-op after finish()
        stats.planned += planned
        stats.planned_bytes += planned_bytes
        record.planned = planned
        if not deleting:
            record.acted, record.acted_bytes = planned, planned_bytes
    if on_progress is not None and planned != reported:
        on_progress(planned)
    if deleting:
        run_logger(__name__).info(
            "uploads %s: %d of %d planned files %s, %d changed since the plan, %d errors",
            run_id,
            record.acted,
            record.planned,
            record.verb,
            record.kept_changed,
            record.errors.count,
        )
    return record


class _Remover:
    """Hands each directory's planned files to the deleting helper process (:mod:`tasks.unlink_helper`).

    The helper re-checks and unlinks them through the directory's descriptor (passed with
    ``SCM_RIGHTS``) on the other core while the scan goes on. The socket's buffer bounds how far the
    scan runs ahead (memory stays flat). :meth:`finish` collects the helper's counts into the record;
    :meth:`abort` stops the helper at once (files it has not reached stay, as they are in the plan).
    When the helper cannot be started (the interpreter is not executable by this user), the same
    checks and unlinks run in this process, right after each directory's plan lines.
    """

    BATCH = 256  # files per message: well under the socket's message size limit even with long names

    def __init__(self, record: RemovalRecord, cutoff: float, *, helper: bool = True) -> None:
        self._record = record
        self._cutoff = cutoff
        self._closed = False
        self._stderr_text = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        if helper:
            self._start_helper(cutoff)
        self._inline = unlink_helper.Tally() if self._process is None else None

    def _start_helper(self, cutoff: float) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", unlink_helper.__file__, repr(cutoff), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            ours.close()
            run_logger(__name__).info(
                "uploads: deleting in this process (the deleting helper could not start: %s)",
                exc.strerror or exc,
            )
            return
        finally:
            theirs.close()
        self._sock = ours

    def submit(self, fd: int, prefix: str, found: list[tuple[str, os.stat_result]]) -> None:
        """Hand over one directory's planned files (their plan lines are already written)."""
        if self._inline is not None:
            files = ((name, st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size) for name, st in found)
            unlink_helper.remove_files(fd, prefix, files, self._cutoff, self._inline)
            return
        batch, sock = self.BATCH, self._sock
        assert sock is not None
        try:
            socket.send_fds(sock, [b"D" + os.fsencode(prefix)], [fd])
            for start in range(0, len(found), batch):
                payload = [
                    (name, st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)
                    for name, st in found[start : start + batch]
                ]
                sock.sendall(b"F" + marshal.dumps(payload))
        except OSError:
            raise UploadsError(
                f"the deleting helper process stopped ({self._stderr()}); the plan lists what was due,"
                " run the cleanup again to finish"
            ) from None

    def finish(self) -> None:
        """Wait until every file handed over is handled; add the counts to the record.

        Raises:
            UploadsError: the helper stopped before answering.
        """
        if self._inline is not None:
            answer = self._inline.as_tuple()
        else:
            try:
                answer = self._answer()
            except (OSError, ValueError, EOFError) as exc:
                raise UploadsError(
                    f"the deleting helper process stopped ({exc}; {self._stderr()}); the plan lists what"
                    " was due, run the cleanup again to finish"
                ) from None
            finally:
                self._close()
        acted, acted_bytes, kept_changed, changed, errors_count, errors = answer
        record = self._record
        record.acted += acted
        record.acted_bytes += acted_bytes
        record.kept_changed += kept_changed
        room = max(0, MAX_RECORDED_ERRORS - len(record.changed))
        record.changed.extend((display_path(rel), reason) for rel, reason in changed[:room])
        for rel, message in errors:
            record.errors.add(rel, "delete", message)
        # Errors beyond those listed are counted, not itemised.
        record.errors.count += errors_count - len(errors)

    def _answer(self) -> tuple[int, int, int, list[tuple[str, str]], int, list[tuple[str, str]]]:
        sock = self._sock
        assert sock is not None
        sock.sendall(b"E")
        header = sock.recv(8)
        if len(header) != 8:
            raise OSError("no answer")
        size, chunks = int.from_bytes(header, "big"), []
        while size > 0:
            chunk = sock.recv(unlink_helper.MAX_MESSAGE)
            if not chunk:
                raise OSError("answer cut short")
            chunks.append(chunk)
            size -= len(chunk)
        # From the helper this process started, over a private socket pair.
        return marshal.loads(b"".join(chunks))  # noqa: S302

    def abort(self) -> None:
        """Stop the helper now (after an error in the scan); a no-op once :meth:`finish` returned."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            self._sock.close()
        process = self._process
        if process is None:
            return
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            self._stderr_text = process.stderr.read().decode("utf-8", "replace")
            process.stderr.close()

    def _stderr(self) -> str:
        self.abort()
        text = self._stderr_text.strip()
        last = text.splitlines()[-1] if text else "no message"
        returncode = self._process.returncode if self._process is not None else None
        return f"exit status {returncode}: {last}"
