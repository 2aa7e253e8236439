"""Uploads: find old files under the uploads root, plan their removal, quarantine or delete them,
purge old quarantine runs and restore a run from quarantine.

Safety properties, and how they hold:

- Nothing outside the root is ever read, moved or removed. The scan opens every directory relative to
  its parent's descriptor with ``O_NOFOLLOW | O_DIRECTORY``; symlinks (to files or directories) are
  never followed and never acted on; no path is ever joined from strings and re-resolved.
- One filesystem: a directory whose ``st_dev`` differs from the root's is not entered unless
  ``cross_filesystem`` is set (a bind mount of ``/`` under the uploads root stays untouched).
- The plan is exactly the files that would go (regular files older than the cutoff, not protected,
  not referenced by the application's database), written as JSON Lines.
- :func:`remove_planned` is the one function that moves or deletes, and only with ``confirm=True``
  (a delete run without a reference query takes its one-pass form, ``_plan_and_delete``, which acts
  per directory right after the scan wrote that directory's files to the plan, with the same checks,
  in a helper process, :mod:`tasks.unlink_helper`, given the directory's descriptor).
  Right before acting it re-checks every file through descriptors (still a regular file, same
  ``st_dev``/``st_ino`` and inode change time, still older than the cutoff, still unreferenced); a
  file that changed is skipped and reported.
- Quarantine is a rename into ``<quarantine>/<run_id>/files/<relative path>`` on the same
  filesystem; ``<quarantine>/<run_id>/manifest.jsonl`` lists what moved, so the run can be restored.

File names are handled as the OS gives them: a name that is not valid UTF-8 is carried as a ``str``
with surrogate escapes (``os.fsdecode``) and written to plans and manifests as base64 of its bytes
(``path_b64``), so it round-trips exactly.

The scan and the plan stream: memory does not grow with the number of files (one batch of candidates
for the database check and a few top-N lists at most).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import grp
import heapq
import json
import marshal
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_string  # the C encoder json.dumps uses
from pathlib import Path
from typing import IO, Literal, NamedTuple
from urllib.parse import unquote, urlsplit

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from tasks import postgres, unlink_helper
from tasks.errors import LockBusy, OpsError, ParameterError
from tasks.reports import Progress
from tasks.runlog import run_logger
from tasks.settings import PostgresSettings, StorageSettings, UploadsSettings

Mode = Literal["quarantine", "delete"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Each directory level holds one descriptor (two while it is listed): bounded far below RLIMIT_NOFILE.
MAX_DEPTH = 256
REFERENCE_BATCH = 2000
# Files of one directory handed on at a time by the scan: bounds memory in a flat directory.
FOUND_CHUNK = 512
MAX_RECORDED_ERRORS = 200
TOP_N = 20
RUN_ID_PATTERN = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{6,32})$")
PLAN_SUFFIX = ".jsonl"
# Where the code of this project lives: a root that is it or holds it would put the code in the plan.
PROJECT_DIR = Path(__file__).resolve().parents[1]
# Directories of the system or of many users. A root that is one of them or an ancestor of one
# (``/`` holds them all) is refused; directories below them (/var/lib/app/uploads) stay allowed.
SYSTEM_DIRECTORIES = tuple(
    Path(p)
    for group in (
        ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found"),
        ("/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/usr"),
        ("/var", "/tmp", "/dev/shm", "/var/tmp", "/run/user"),  # noqa: S108  # refused, never written
        ("/usr/bin", "/usr/include", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/sbin"),
        ("/usr/share", "/usr/src", "/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/lock"),
        ("/var/log", "/var/mail", "/var/opt", "/var/run", "/var/spool", "/var/www"),
    )
    for p in group
)
_ROOT_FIX = (
    "set uploads.root (OPS_UPLOADS__ROOT) to the application's uploads directory itself,"
    " e.g. /var/lib/app/uploads"
)


class UploadsError(OpsError):
    """Base of the uploads cleanup's errors."""


class UploadsRootInvalid(UploadsError):
    """The uploads root is missing or not a directory."""


class UploadsRootRefused(UploadsRootInvalid):
    """The uploads root is a place the cleanup must never scan (the system, the home or project
    directory, a symlink, the cleanup's own storage) or is owned by another than the expected user."""


class QuarantineInvalid(UploadsError):
    """The quarantine directory cannot be used (another filesystem, inside the root...)."""


class ReferenceCheckFailed(UploadsError):
    """The application's database could not say which uploads it references; nothing was removed."""


class PlanInvalid(UploadsError):
    """A plan or manifest file is unreadable or names a path that is not inside the root."""


class QuarantineRunNotFound(UploadsError):
    """No quarantine run has the given id."""


# --------------------------------------------------------------------------------------------------
# Paths, names and small records


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


# --------------------------------------------------------------------------------------------------
# Protect patterns


def _glob_to_regex(pattern: str) -> str:
    """Translate a glob where '*' and '?' stay within one name and '**' crosses directories."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and (j := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : j]
            negate = body.startswith("!")
            body = re.sub(r"([\\^])", r"\\\1", body[1:] if negate else body)
            out.append(f"[{'^/' if negate else ''}{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


_GLOB_CHARS = frozenset("*?[")


class ProtectMatcher:
    """Decides whether a relative path is protected by one of the settings' patterns.

    A pattern without '/' matches the file name at any depth (``.gitkeep``); one with '/' matches the
    whole relative path (``keep/**``, ``avatars/*.png``). The common shapes get fast paths, since the
    scan asks once per old file: literal names are a set, ``dir/**`` is a prefix test done once per
    directory; any other pattern is one regex.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(p.strip("/") for p in patterns if p.strip("/"))
        names: set[str] = set()
        prefixes: list[str] = []
        name_globs: list[str] = []
        path_globs: list[str] = []
        for pattern in self.patterns:
            if "/" not in pattern:
                if _GLOB_CHARS & set(pattern):
                    name_globs.append(_glob_to_regex(pattern))
                else:
                    names.add(pattern)
            elif pattern.endswith("/**") and not _GLOB_CHARS & set(pattern[:-3]):
                prefixes.append(pattern[:-2])
            else:
                path_globs.append(_glob_to_regex(pattern))
        self.names = frozenset(names)
        self.dir_prefixes = tuple(prefixes)
        name_re = re.compile("(?s:" + "|".join(name_globs) + r")\Z") if name_globs else None
        path_re = re.compile("(?s:" + "|".join(path_globs) + r")\Z") if path_globs else None
        self.other: Callable[[str, str], bool] | None = None
        if name_re is not None or path_re is not None:

            def other(rel: str, name: str) -> bool:
                return bool(
                    (name_re is not None and name_re.match(name))
                    or (path_re is not None and path_re.match(rel))
                )

            self.other = other

    def covers_directory(self, prefix: str) -> bool:
        """Whether every file below directory ``prefix`` (relative, ending in '/') is protected."""
        return bool(self.dir_prefixes) and prefix.startswith(self.dir_prefixes)

    def matches(self, rel: str) -> bool:
        """Whether the file at ``rel`` (relative to the root) is protected."""
        directory, _, name = rel.rpartition("/")
        if name in self.names or self.covers_directory(directory + "/" if directory else ""):
            return True
        return self.other is not None and self.other(rel, name)


# --------------------------------------------------------------------------------------------------
# Root, quarantine, plan locations, disk usage


@dataclass(frozen=True)
class RootCheck:
    """The uploads root's identity and the runbook's owner/permissions check."""

    path: Path
    dev: int
    owner: str
    group: str
    mode: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def location_refusal(path: Path, *, home: Path | None, project: Path = PROJECT_DIR) -> str | None:
    """Why ``path`` (absolute, normalised) may not be the uploads root, or None when it may.

    Refused: a system directory or an ancestor of one (``/``, ``/etc``, ``/var``, ``/tmp``...), the
    home directory or an ancestor of it, the project's own directory or an ancestor of it. A directory
    below any of these is allowed.
    """
    for system in SYSTEM_DIRECTORIES:
        if _inside(system, path):
            return (
                f"it is the system directory {system}"
                if path == system
                else f"it is an ancestor of the system directory {system}"
            )
    if home is not None and _inside(home, path):
        return f"it is the home directory {home} or an ancestor of it"
    if _inside(project, path):
        return f"it is the project's own directory {project} or an ancestor of it"
    return None


def refuse_location(root: Path) -> None:
    """Refuse a root that :func:`location_refusal` names a rule for (plain functions call this too,
    so a caller that skips :func:`check_root` still cannot scan the system).

    Raises:
        UploadsRootRefused: the rule, and how to fix the setting.
    """
    try:
        home: Path | None = Path.home()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry: no home to protect
        home = None
    normal = Path(os.path.abspath(root))
    resolved = Path(os.path.realpath(root))
    homes: list[Path | None] = [None]
    if home is not None:
        homes = [Path(os.path.abspath(home)), Path(os.path.realpath(home))]
    for candidate in dict.fromkeys((normal, resolved)):
        for protected_home in homes:
            reason = location_refusal(candidate, home=protected_home)
            if reason is not None:
                raise UploadsRootRefused(f"uploads root {root} refused: {reason}; {_ROOT_FIX}")


def _storage_refusal(root: Path, uploads: UploadsSettings, storage: StorageSettings | None) -> str | None:
    """Why ``root`` (resolved) overlaps the cleanup's own storage, or None."""
    places: list[tuple[str, Path, str]] = [
        (
            "the quarantine",
            quarantine_directory(uploads, root),
            "set uploads.quarantine_dir (OPS_UPLOADS__QUARANTINE_DIR) to a directory beside the root",
        )
    ]
    if storage is not None:
        parts = urlsplit(storage.url)
        if parts.scheme == "file":
            places.append(
                (
                    "the backup storage",
                    Path(unquote(parts.netloc + parts.path)),
                    "set storage.url (OPS_STORAGE__URL) to a directory outside the uploads root",
                )
            )
    if storage is not None or uploads.plan_dir is not None:
        places.append(
            (
                "the cleanup's plans",
                plan_directory(uploads, storage or StorageSettings()),
                "set uploads.plan_dir (OPS_UPLOADS__PLAN_DIR) to a directory outside the uploads root",
            )
        )
    for what, place, fix in places:
        place = Path(os.path.realpath(place))
        if _inside(place, root) or _inside(root, place):
            return f"it holds {what} {place} (or lies inside it); {fix}"
    return None


def check_root(settings: UploadsSettings, storage: StorageSettings | None = None) -> RootCheck:
    """Refuse a root that could put the system or the cleanup's own data in a plan; then resolve it
    and check its owner and mode against the settings.

    Every rule is checked before anything below the root is read. Refused: a symlink as the root
    (the configured path itself); a system directory or an ancestor of one, the home directory, the
    project's own directory (:func:`location_refusal`); a root that holds (or lies inside) the
    quarantine, the backup storage (``storage``, when given) or the plans; a root whose owner is not
    ``expected_owner`` (name or uid) when that is set. A mode other than ``expected_mode`` is reported
    in ``problems``, not refused.

    Raises:
        UploadsRootRefused: one of the rules above; the message names it and how to fix the setting.
        UploadsRootInvalid: the root does not exist or is not a directory.
    """
    configured = settings.root
    if os.path.islink(configured):
        raise UploadsRootRefused(
            f"uploads root {configured} refused: it is a symlink (to {os.readlink(configured)}), and a"
            f" link can be pointed anywhere; set uploads.root (OPS_UPLOADS__ROOT) to the directory itself"
            " after checking it is the application's uploads directory"
        )
    refuse_location(configured)
    path = Path(os.path.realpath(configured))
    reason = _storage_refusal(path, settings, storage)
    if reason is not None:
        raise UploadsRootRefused(f"uploads root {configured} refused: {reason}")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UploadsRootInvalid(
            f"uploads root {configured} cannot be examined ({exc.strerror}); fix uploads.root"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UploadsRootInvalid(f"uploads root {configured} is not a directory; fix uploads.root")
    owner, group, mode = _user_name(st.st_uid), _group_name(st.st_gid), f"{stat.S_IMODE(st.st_mode):04o}"
    expected = settings.expected_owner
    if expected and expected not in {owner, str(st.st_uid)}:
        raise UploadsRootRefused(
            f"uploads root {path} refused: it is owned by {owner} (uid {st.st_uid}), not by"
            f" uploads.expected_owner {expected}; if it is the application's uploads directory, chown"
            f" {expected} {path}, otherwise {_ROOT_FIX}"
        )
    problems = []
    if settings.expected_mode and int(settings.expected_mode, 8) != stat.S_IMODE(st.st_mode):
        problems.append(
            f"mode {mode}, expected {settings.expected_mode}: chmod {settings.expected_mode} {path}"
        )
    return RootCheck(path=path, dev=st.st_dev, owner=owner, group=group, mode=mode, problems=tuple(problems))


def quarantine_directory(settings: UploadsSettings, root: Path) -> Path:
    """The configured quarantine directory, or ``<root>/../.uploads-quarantine``, resolved."""
    configured = settings.quarantine_dir
    return Path(
        os.path.realpath(configured if configured is not None else root.parent / ".uploads-quarantine")
    )


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


def plan_directory(uploads: UploadsSettings, storage: StorageSettings) -> Path:
    """Where plans go: ``uploads.plan_dir``, else next to file:// backups, else ``./var/uploads-plans``."""
    if uploads.plan_dir is not None:
        return uploads.plan_dir
    parts = urlsplit(storage.url)
    if parts.scheme == "file":
        return Path(unquote(parts.netloc + parts.path)) / "uploads-plans"
    return Path("var") / "uploads-plans"


@dataclass(frozen=True)
class DiskUsage:
    """The runbook's ``df -h`` for the filesystem of one path."""

    path: str
    total: int
    used: int
    free: int

    @property
    def used_percent(self) -> float:
        return round(100 * self.used / self.total, 1) if self.total else 0.0


def disk_usage(path: Path) -> DiskUsage:
    """Total, used and free bytes of the filesystem holding ``path``."""
    usage = shutil.disk_usage(path)
    return DiskUsage(path=str(path), total=usage.total, used=usage.used, free=usage.free)


def new_run_id(now: datetime | None = None, token: str | None = None) -> str:
    """A dated, unique run id such as ``20261128T021500Z-3fa2b1c0``."""
    now = now or datetime.now(UTC)
    token = (token or secrets.token_hex(4)).replace("-", "").lower()[:12]
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{token}"


def run_id_time(run_id: str) -> datetime:
    """The time a run id was made.

    Raises:
        ParameterError: not a run id.
    """
    match = RUN_ID_PATTERN.match(run_id)
    if match is None:
        raise ParameterError(f"{run_id!r} is not a cleanup run id (like 20261128T021500Z-3fa2b1c0)")
    stamp = match.group(1)
    try:
        return datetime(
            int(stamp[0:4]),
            int(stamp[4:6]),
            int(stamp[6:8]),
            int(stamp[9:11]),
            int(stamp[11:13]),
            int(stamp[13:15]),
            tzinfo=UTC,
        )
    except ValueError:
        raise ParameterError(f"{run_id!r} is not a cleanup run id (its date is impossible)") from None


@contextlib.contextmanager
def cleanup_lock(directory: Path) -> Iterator[Path]:
    """Hold an exclusive lock for one cleanup of this root at a time (released when the process dies).

    Raises:
        LockBusy: another cleanup or restore holds it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".cleanup-uploads.lock"
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(
                f"another uploads cleanup or restore is running (lock {path}); wait for it to finish"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {_iso(time.time())}\n")
        handle.flush()
        yield path
    finally:
        handle.close()


# --------------------------------------------------------------------------------------------------
# Scan


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
) -> Iterator[tuple[int, str, list[tuple[str, os.stat_result]]]]:
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


# --------------------------------------------------------------------------------------------------
# Database references


class ReferenceChecker:
    """Asks the application's database which of a batch of relative paths it still references.

    The configured query runs as a subquery filtered with ``path = ANY(%s)``, one round trip per batch,
    so memory stays bounded and an index on the referenced column is used. A stored value matches as
    the relative path itself or as ``reference_prefix`` + relative path. A name that is not valid UTF-8
    cannot be stored in a text column and so is never referenced.
    """

    def __init__(self, conn: psycopg.Connection, query: str, prefix: str | None, pg: PostgresSettings):
        self._conn = conn
        self._pg = pg
        self._prefix = prefix or ""
        body = query.strip().rstrip(";").strip().replace("%", "%%")
        self._statement = sql.SQL(
            "SELECT refs.path FROM ({}) AS refs(path) WHERE refs.path = ANY(%s)"
        ).format(
            sql.SQL(body)  # type: ignore[arg-type]  # operator-configured SQL, not user input
        )

    def referenced(self, rels: Iterable[str]) -> set[str]:
        """The subset of ``rels`` the database references now.

        Raises:
            ReferenceCheckFailed: the query failed; nothing may be removed on a guess.
        """
        forms: dict[str, str] = {}
        for rel in rels:
            if _is_utf8(rel):
                forms[rel] = rel
                if self._prefix:
                    forms[self._prefix + rel] = rel
        if not forms:
            return set()
        try:
            rows = self._conn.execute(self._statement, [list(forms)]).fetchall()
        except psycopg.Error as exc:
            raise ReferenceCheckFailed(
                f"the reference query failed ({postgres.safe_error(exc, self._pg)}); nothing was removed."
                " Fix uploads.reference_query (it must return the stored paths in its first column)"
            ) from None
        return {forms[row[0]] for row in rows if row[0] in forms}


@contextlib.contextmanager
def reference_checker(
    uploads: UploadsSettings, pg: PostgresSettings | None
) -> Iterator[ReferenceChecker | None]:
    """A :class:`ReferenceChecker` on its own read-only connection, or None when no query is set.

    Raises:
        ReferenceCheckFailed: the database cannot be reached.
    """
    if not uploads.reference_query:
        yield None
        return
    if pg is None:
        raise ReferenceCheckFailed("uploads.reference_query is set but no PostgreSQL settings were given")
    try:
        conn = postgres.connect(pg, application_name="swagger2mcp-ops-uploads")
        # A query that writes (a data-modifying CTE) must fail rather than change the application's data.
        conn.execute("SET default_transaction_read_only = on")
    except psycopg.Error as exc:
        raise ReferenceCheckFailed(
            f"cannot reach the application's database ({postgres.safe_error(exc, pg)}); nothing was"
            " removed. Check postgres.dsn, or unset uploads.reference_query to skip the check"
        ) from None
    prefix = uploads.reference_prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    with conn:
        yield ReferenceChecker(conn, uploads.reference_query, prefix, pg)


def _batches(entries: Iterable[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    batch: list[FileEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def select_unreferenced(
    candidates: Iterable[FileEntry],
    stats: ScanStats,
    references: ReferenceChecker,
    *,
    batch_size: int = REFERENCE_BATCH,
) -> Iterator[FileEntry]:
    """Drop the files the database references (one query per batch), counting them; yield the rest."""
    batch: list[FileEntry] = []
    for entry in candidates:
        batch.append(entry)
        if len(batch) >= batch_size:
            yield from _unreferenced(batch, references, stats)
            batch = []
    if batch:
        yield from _unreferenced(batch, references, stats)


def _unreferenced(
    batch: list[FileEntry], references: ReferenceChecker, stats: ScanStats
) -> Iterator[FileEntry]:
    referenced = references.referenced(e.rel for e in batch)
    for entry in batch:
        if entry.rel in referenced:
            stats.referenced += 1
            stats.referenced_bytes += entry.size
        else:
            yield entry


# --------------------------------------------------------------------------------------------------
# Plan


@dataclass
class PlanSummary:
    """The plan of one run: counts, where the full list is, and its largest and oldest files."""

    run_id: str
    root: str
    cutoff: float
    plan_path: str
    stats: ScanStats
    largest: list[FileEntry] = field(default_factory=list)
    oldest: list[FileEntry] = field(default_factory=list)
    complete: bool = False

    @property
    def cutoff_iso(self) -> str:
        return _iso(self.cutoff)


class PlanWriter:
    """Writes plan entries as JSON Lines while they stream past, keeping the largest and oldest.

    The file is written under a temporary name and renamed when the plan is complete, so a plan cut
    short by an error is never mistaken for a whole one (the partial file is kept, as the record of
    what was already handled).
    """

    def __init__(self, path: Path, stats: ScanStats, *, top_n: int = TOP_N) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.stats = stats
        self.top_n = top_n
        self.largest: list[tuple[int, int, FileEntry]] = []
        self.oldest: list[tuple[int, int, FileEntry]] = []
        self.complete = False

    def tee(self, entries: Iterable[FileEntry]) -> Iterator[FileEntry]:
        """Yield ``entries`` unchanged, each written to the plan first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        largest, oldest, top_n = self.largest, self.oldest, self.top_n
        push, replace = heapq.heappush, heapq.heapreplace
        planned = planned_bytes = 0
        try:
            with self.partial.open("w", encoding="utf-8", buffering=1 << 20) as out:
                # Lines are joined and written in blocks: one write call per line costs more than
                # formatting the line.
                lines: list[str] = []
                add = lines.append
                for entry in entries:
                    rel, size, mtime_ns, dev, ino, ctime_ns = entry
                    if rel.isascii():
                        add(
                            f'{{"path":{_json_string(rel)},"size":{size},"mtime_ns":{mtime_ns},'
                            f'"dev":{dev},"ino":{ino},"ctime_ns":{ctime_ns}}}\n'
                        )
                    else:
                        add(entry.to_json_line())
                    if len(lines) >= 1024:
                        out.write("".join(lines))
                        lines.clear()
                    planned += 1
                    planned_bytes += size
                    # Heaps of (key, sequence, entry), smallest key on top; cheap reject first.
                    if len(largest) < top_n:
                        push(largest, (size, planned, entry))
                    elif size > largest[0][0]:
                        replace(largest, (size, planned, entry))
                    if len(oldest) < top_n:
                        push(oldest, (-mtime_ns, planned, entry))
                    elif -mtime_ns > oldest[0][0]:
                        replace(oldest, (-mtime_ns, planned, entry))
                    yield entry
                out.write("".join(lines))
            self.partial.replace(self.path)
            self.complete = True
        finally:
            self.stats.planned += planned
            self.stats.planned_bytes += planned_bytes

    def summary(self, run_id: str, root: Path, cutoff: float) -> PlanSummary:
        def ranked(heap: list) -> list[FileEntry]:
            return [entry for _, _, entry in sorted(heap, key=lambda item: (-item[0], item[1]))]

        return PlanSummary(
            run_id=run_id,
            root=str(root),
            cutoff=cutoff,
            plan_path=str(self.path if self.complete else self.partial),
            stats=self.stats,
            largest=ranked(self.largest),
            oldest=ranked(self.oldest),
            complete=self.complete,
        )


def iter_plan(
    uploads: UploadsSettings,
    references: ReferenceChecker | None,
    *,
    root: Path,
    cutoff: float,
    stats: ScanStats,
) -> Iterator[FileEntry]:
    """The plan as a stream: regular files older than ``cutoff``, not protected, not referenced."""
    old = scan_old_files(
        root,
        cutoff,
        stats,
        cross_filesystem=uploads.cross_filesystem,
        protect=ProtectMatcher(uploads.protect),
    )
    return old if references is None else select_unreferenced(old, stats, references)


@dataclass
class CleanupOutcome:
    """A plan and what was done with it."""

    plan: PlanSummary
    removal: RemovalRecord


def clean_uploads(
    uploads: UploadsSettings,
    pg: PostgresSettings | None,
    *,
    root: Path,
    cutoff: float,
    run_id: str,
    plan_path: Path,
    mode: Mode,
    confirm: bool = False,
    quarantine: Path | None = None,
    from_plan: Path | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> CleanupOutcome:
    """Plan the cleanup and hand the plan, as it streams, to :func:`remove_planned`.

    The dry run (``confirm=False``) and the real run go through the same code: the plan is computed,
    written to ``plan_path`` and counted identically; only :func:`remove_planned` acts or not.
    With ``from_plan`` (a plan a dry run wrote and someone reviewed), exactly those files are
    considered instead of a new scan; each is still re-checked before it is touched.

    Raises:
        ReferenceCheckFailed: the database could not be asked (nothing after that point is touched).
        PlanInvalid: ``from_plan`` is unreadable or names paths outside the root.
        UploadsRootRefused: ``root`` is a system, home or project directory (:func:`location_refusal`).
    """
    refuse_location(root)
    stats = ScanStats()
    writer = PlanWriter(plan_path, stats)
    with reference_checker(uploads, pg) as references:
        if from_plan is None and references is None and (not confirm or mode == "delete"):
            # Nothing to ask the database and nothing to move: plan (and delete) in one directory pass.
            _check_removal_arguments(mode, quarantine, run_id)
            removal = _plan_and_delete(
                uploads,
                writer,
                root=root,
                cutoff=cutoff,
                run_id=run_id,
                mode=mode,
                confirm=confirm,
                on_progress=on_progress,
            )
        else:
            if from_plan is not None:
                # Every record is validated before the first file is touched: a bad line deep in a
                # reviewed plan must not stop the run half way.
                for _ in read_jsonl(from_plan):
                    pass
                planned: Iterable[FileEntry] = read_jsonl(from_plan)
            else:
                planned = iter_plan(uploads, references, root=root, cutoff=cutoff, stats=stats)
            removal = remove_planned(
                uploads,
                pg,
                writer.tee(planned),
                root=root,
                mode=mode,
                cutoff=cutoff,
                run_id=run_id,
                confirm=confirm,
                quarantine=quarantine,
                references=references,
                on_progress=on_progress,
            )
    plan = writer.summary(run_id, root, cutoff)
    run_logger(__name__).info(
        "uploads plan %s: %d scanned, %d older than cutoff, %d protected, %d referenced, %d planned",
        run_id,
        stats.scanned_files,
        stats.matched,
        stats.protected,
        stats.referenced,
        stats.planned,
    )
    return CleanupOutcome(plan=plan, removal=removal)


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
        return marshal.loads(b"".join(chunks))  # type: ignore[no-any-return]  # noqa: S302

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


# --------------------------------------------------------------------------------------------------
# Acting: descriptor-relative directory chains


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


# --------------------------------------------------------------------------------------------------
# The one confirm-gated function that removes uploads


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
        # A dry run changes nothing, so there is nothing to re-check: count what would go.
        count = nbytes = 0
        for entry in entries:
            count += 1
            nbytes += entry[1]
            if on_progress is not None and count % batch_size == 0:
                on_progress(count)
        record.planned = record.acted = count
        record.acted_bytes = nbytes
        return record
    root_fd = _open_dir(root)
    root_dev = os.fstat(root_fd).st_dev
    sources = _DirChain(root_fd, root_dev, cross_filesystem=uploads.cross_filesystem)
    targets: _DirChain | None = None
    manifest = None
    run_fd = files_fd = -1
    try:
        if mode == "quarantine":
            assert quarantine is not None
            run_dir = quarantine / run_id
            run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            run_fd = _open_dir(run_dir)
            with contextlib.suppress(FileExistsError):
                os.mkdir("files", 0o700, dir_fd=run_fd)
            files_fd = os.open("files", _DIR_FLAGS, dir_fd=run_fd)
            if os.fstat(files_fd).st_dev != root_dev:
                raise QuarantineInvalid(f"quarantine {quarantine} is on another filesystem than {root}")
            targets = _DirChain(files_fd, root_dev, cross_filesystem=False, create_mode=0o700)
            manifest = (run_dir / "manifest.jsonl").open("a", encoding="utf-8")
            record.quarantine_run = str(run_dir)
            record.manifest_path = str(run_dir / "manifest.jsonl")
        with contextlib.ExitStack() as stack:
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
    finally:
        sources.close()
        if targets is not None:
            targets.close()
        if manifest is not None:
            manifest.close()
        for fd in (files_fd, run_fd, root_fd):
            if fd != -1:
                os.close(fd)
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


# --------------------------------------------------------------------------------------------------
# Quarantine retention and restore


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
    root_fd = _open_dir(root)
    root_dev = os.fstat(root_fd).st_dev
    files_fd = _open_dir(run_dir / "files")
    sources = _DirChain(files_fd, os.fstat(files_fd).st_dev, cross_filesystem=False)
    targets = _DirChain(
        root_fd, root_dev, cross_filesystem=cross_filesystem, create_mode=0o755 if confirm else None
    )
    try:
        for entry in read_jsonl(manifest):
            parent, _, name = entry.rel.rpartition("/")
            try:
                source_fd = sources.open(parent)
                try:
                    st = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
                except FileNotFoundError:
                    record.already_restored += 1
                    continue
                if not stat.S_ISREG(st.st_mode):
                    record.errors.add(entry.rel, "restore", "not a regular file in quarantine; left there")
                    continue
                try:
                    target_fd = targets.open(parent)
                except _Changed:
                    if confirm:
                        raise
                    target_fd = -1
                if target_fd != -1:
                    try:
                        os.stat(name, dir_fd=target_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        pass
                    else:
                        record.conflicts.append(display_path(entry.rel))
                        continue
                if confirm:
                    os.rename(name, name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
                record.restored += 1
                record.restored_bytes += st.st_size
            except _Changed as why:
                record.errors.add(entry.rel, "restore", str(why))
            except OSError as exc:
                record.errors.add(entry.rel, "restore", exc)
    finally:
        sources.close()
        targets.close()
        os.close(files_fd)
        os.close(root_fd)
    return record


def latest_quarantine_runs(quarantine: Path, limit: int = 10) -> list[str]:
    """The newest quarantine run ids, newest first (for messages and reports)."""
    if not quarantine.is_dir():
        return []
    names = [e.name for e in os.scandir(quarantine) if RUN_ID_PATTERN.match(e.name)]
    return sorted(names, reverse=True)[:limit]


# --------------------------------------------------------------------------------------------------
# Prefect tasks

check_root_task = task(check_root, name="check-uploads-root", cache_policy=NO_CACHE)
prepare_quarantine_task = task(prepare_quarantine, name="prepare-uploads-quarantine", cache_policy=NO_CACHE)
disk_usage_task = task(disk_usage, name="disk-usage", cache_policy=NO_CACHE, retries=1)
clean_uploads_task = task(clean_uploads, name="clean-uploads", cache_policy=NO_CACHE)
remove_planned_task = task(remove_planned, name="remove-planned-uploads", cache_policy=NO_CACHE)
purge_quarantine_task = task(purge_quarantine, name="purge-uploads-quarantine", cache_policy=NO_CACHE)
restore_quarantine_task = task(
    restore_quarantine_run, name="restore-uploads-quarantine", cache_policy=NO_CACHE
)


def progress_reporter(key: str, total: int | None, every: int = 20000) -> Callable[[int], None]:
    """An ``on_progress`` callback: logs every ``every`` files and, when the total is known (a saved
    plan), updates a progress artifact (silent outside a run)."""
    artifact = Progress(key, f"Planned uploads handled, of {total}") if total else None
    state = {"logged": 0}

    def report(done: int) -> None:
        if artifact is not None and total:
            artifact.update(100.0 * done / total)
        if done - state["logged"] >= every:
            state["logged"] = done
            run_logger(__name__).info("uploads: %d planned files handled so far", done)

    return report


def count_plan(path: Path) -> int:
    """How many entries a plan file holds (for progress)."""
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError as exc:
        raise PlanInvalid(f"cannot read plan {path}: {exc.strerror}") from None
