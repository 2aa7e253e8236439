"""Paths, names and small records: the plan and manifest record of one file, the reported-error
log, and the descriptor flags every directory is opened with."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_string  # the C encoder json.dumps uses
from pathlib import Path
from typing import Literal, NamedTuple

from tasks.runlog import run_logger
from tasks.uploads.errors import PlanInvalid

Mode = Literal["quarantine", "delete"]


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


MAX_RECORDED_ERRORS = 200


def display_path(rel: str) -> str:
    """A printable form of a relative path: invalid UTF-8 bytes as U+FFFD, control characters escaped."""
    text = os.fsencode(rel).decode("utf-8", errors="replace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _is_utf8(rel: str) -> bool:
    if rel.isascii():
        return True
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FileEntry(NamedTuple):
    """A regular file under the root, as seen by the scan (a tuple: millions are made per run).

    ``rel`` is the path relative to the root with ``/`` separators, in ``os.fsdecode`` form.
    """

    rel: str
    size: int
    mtime_ns: int
    dev: int
    ino: int
    ctime_ns: int

    @property
    def mtime(self) -> float:
        """The modification time in seconds since the epoch."""
        return self.mtime_ns / 1_000_000_000  # int / int: correctly rounded

    def to_json_line(self) -> str:
        """One JSON Lines record; a name that is not UTF-8 also carries its bytes as ``path_b64``."""
        rel = self.rel
        if rel.isascii() or _is_utf8(rel):
            head = '{"path":' + _json_string(rel)
        else:
            raw = base64.b64encode(os.fsencode(rel)).decode("ascii")
            head = f'{{"path":{_json_string(display_path(rel))},"path_b64":"{raw}"'
        return (
            f'{head},"size":{self.size},"mtime_ns":{self.mtime_ns},"dev":{self.dev},"ino":{self.ino},'
            f'"ctime_ns":{self.ctime_ns}}}\n'
        )

    @classmethod
    def from_json_line(cls, line: str) -> FileEntry:
        """Parse a record written by :meth:`to_json_line`.

        Raises:
            PlanInvalid: the line is not such a record, or its path could leave the root.
        """
        try:
            data = json.loads(line)
            raw = data.get("path_b64")
            rel = os.fsdecode(base64.b64decode(raw, validate=True)) if raw else data["path"]
            entry = cls(
                rel=rel,
                size=int(data["size"]),
                # Plans written before mtime_ns carried seconds as a float.
                mtime_ns=(
                    int(data["mtime_ns"]) if "mtime_ns" in data else _seconds_to_ns(float(data["mtime"]))
                ),
                dev=int(data["dev"]),
                ino=int(data["ino"]),
                ctime_ns=int(data["ctime_ns"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanInvalid(f"not a plan record ({exc}): {line[:200]!r}") from None
        if not isinstance(rel, str) or not _safe_relative(rel):
            raise PlanInvalid(
                f"plan record names a path outside the root: {line[:200]!r}; the plan was altered"
            )
        return entry


def _seconds_to_ns(seconds: float) -> int:
    # Whole seconds and the fraction apart: a float near 1.7e18 cannot hold nanoseconds exactly.
    whole = int(seconds // 1)
    return whole * 1_000_000_000 + round((seconds - whole) * 1e9)


def _safe_relative(rel: str) -> bool:
    """A relative path of plain names: no leading '/', no '.', '..' or empty component, no NUL."""
    if not rel or "\x00" in rel:
        return False
    framed = f"/{rel}/"
    return "//" not in framed and "/./" not in framed and "/../" not in framed


def read_jsonl(path: Path) -> Iterator[FileEntry]:
    """Stream the records of a plan or manifest file."""
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise PlanInvalid(f"cannot read {path}: {exc.strerror}; run a new dry run to write a plan") from None
    with handle:
        for line in handle:
            if line.strip():
                yield FileEntry.from_json_line(line)


@dataclass
class ErrorLog:
    """Errors that are reported, not fatal (permission denied, a file that vanished mid-operation)."""

    count: int = 0
    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, rel: str, operation: str, exc: OSError | str) -> None:
        self.count += 1
        if len(self.items) < MAX_RECORDED_ERRORS:
            message = exc if isinstance(exc, str) else (exc.strerror or str(exc))
            self.items.append((display_path(rel) or ".", operation, message))
            run_logger(__name__).warning("uploads: %s %s: %s", operation, display_path(rel) or ".", message)
