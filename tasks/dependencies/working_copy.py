"""The working copy: where an update is made, apart from the application's live checkout.

It is a ``git clone`` of the live checkout, or a copy plus ``git init`` when that is not a repository;
the live checkout is only read.

Each run makes its own run directory in ``dependencies.work_dir`` (the working copy with its
node_modules, npm's userconfig), named ``<time>-<scope>-<hex>`` and holding the marker file
:data:`RUN_MARKER`. The run holds an exclusive ``flock`` on its marker while it lasts, so retention
(:func:`prune_working_copies`) recognises the directories runs made by their name *and* marker, keeps
the newest, never touches one a run still uses, and never anything else in ``work_dir``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks.commands import CommandResult
from tasks.dependencies.environment import LOCKFILES, DependencyError, NpmEnvironment
from tasks.errors import ParameterError
from tasks.runlog import run_logger


@dataclass(frozen=True)
class WorkingCopy:
    """Where the update is made: a git repository separate from the live checkout.

    ``branch`` is the branch an update will be committed on; it is created only by that commit, so a
    run with nothing to update leaves no branch behind.
    """

    path: Path
    source: Path
    branch: str
    base_commit: str
    source_commit: str | None
    lockfile: str

    @property
    def lockfile_path(self) -> Path:
        return self.path / self.lockfile


def check_source(source: Path) -> str:
    """Validate the live checkout before anything happens; return its lockfile's name.

    Raises:
        ParameterError: no package.json, or no lockfile (updates are reviewed as lockfile diffs).
    """
    if not (source / "package.json").is_file():
        raise ParameterError(
            f"{source} has no package.json; set dependencies.source_dir (OPS_DEPENDENCIES__SOURCE_DIR) "
            "to the application's checkout"
        )
    for name in LOCKFILES:
        if (source / name).is_file():
            return name
    raise ParameterError(
        f"{source} has no package-lock.json; run `npm install` there and commit the lockfile first"
    )


def _clone(npm: NpmEnvironment, source: Path, dest: Path) -> str:
    """Clone the git checkout ``source`` (its committed state: what is deployed); return its commit."""
    # git refuses a repository another user owns (the deploy user's checkout) unless it is marked safe.
    safe = ["-c", f"safe.directory={source}"]
    commit = npm.git([*safe, "-C", str(source), "rev-parse", "HEAD"], None).stdout.strip()
    npm.git([*safe, "clone", "--quiet", "--no-hardlinks", "--", str(source), str(dest)], None)
    return commit


def _copy_as_repository(npm: NpmEnvironment, source: Path, dest: Path) -> None:
    """Copy ``source`` (without node_modules) and commit it as the baseline of a new repository."""
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("node_modules", ".git"))
    npm.git(["init", "--quiet"], dest)
    npm.git(["add", "--all"], dest)
    npm.git(["commit", "--quiet", "--message", f"Baseline: copy of {source}"], dest)


def create_working_copy(npm: NpmEnvironment, source: Path, dest: Path, branch: str) -> WorkingCopy:
    """Make ``dest`` a working copy of ``source`` for an update on ``branch``, without writing to ``source``.

    A git checkout is cloned (its committed state: what is deployed); any other directory is copied
    (without node_modules) and committed as the baseline of a new repository. ``branch`` is not
    created here: :func:`~tasks.dependencies.apply.commit_update` creates it with the update's commit.

    Raises:
        ParameterError: ``source`` is not an npm project with a lockfile.
        DependencyError: ``dest`` already exists.
    """
    source = source.resolve()
    lockfile = check_source(source)
    if dest.exists():
        raise DependencyError(f"working copy {dest} already exists; remove it or use another run name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    source_commit: str | None = None
    if (source / ".git").exists():
        source_commit = _clone(npm, source, dest)
    else:
        _copy_as_repository(npm, source, dest)
    if not (dest / lockfile).is_file():
        raise ParameterError(
            f"{source}'s committed state has no {lockfile} (it is not committed); commit it first"
        )
    base = npm.git(["rev-parse", "HEAD"], dest).stdout.strip()
    run_logger(__name__).info("working copy %s of %s at %s", dest, source, base[:12])
    return WorkingCopy(dest, source, branch, base, source_commit, lockfile)


def install(npm: NpmEnvironment, wc: WorkingCopy) -> CommandResult:
    """``npm ci``: install exactly what the lockfile says (the state the update starts from)."""
    return npm.npm(["ci"], wc.path, npm.settings.install_timeout_seconds)


RUN_MARKER = ".swagger2mcp-ops-run"
_RUN_NAME = re.compile(r"^\d{8}T\d{6}Z-[a-z]+-[0-9a-f]{6}$")


def run_directory_name(started: datetime, scope: str, suffix: str) -> str:
    """``20260105T020000Z-security-1a2b3c``: sorts by start time; ``suffix`` (6 hex) keeps runs of the
    same second apart."""
    name = f"{started.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}-{scope}-{suffix}"
    if not _RUN_NAME.match(name):
        raise ValueError(f"{name!r} is not a run directory name (<time>-<scope>-<6 hex>)")
    return name


@contextlib.contextmanager
def claim_run_directory(work_dir: Path, name: str, *, flow_run_id: str | None = None) -> Iterator[Path]:
    """Create ``work_dir/name`` with its marker and hold the marker's lock until the block ends.

    The lock is what marks the directory as in use: retention skips a directory whose marker another
    process (or this one, through another descriptor) has locked.

    Raises:
        DependencyError: ``work_dir/name`` exists already (it is never reused).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / name
    try:
        path.mkdir()
    except FileExistsError:
        raise DependencyError(
            f"run directory {path} already exists; it is never reused, start the run again"
        ) from None
    descriptor = os.open(path / RUN_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "w") as marker:
        fcntl.flock(marker, fcntl.LOCK_EX)
        marker.write(
            json.dumps(
                {
                    "created_by": "swagger2mcp-ops update-dependencies",
                    "created_at": datetime.now(UTC).isoformat(),
                    "flow_run_id": flow_run_id,
                    "pid": os.getpid(),
                }
            )
            + "\n"
        )
        marker.flush()
        yield path


@dataclass(frozen=True)
class WorkingCopyPrune:
    """Retention of run directories: which were kept, skipped as in use, removed, or failed to go.

    ``confirmed`` false: ``removed`` lists what a confirmed prune would remove (nothing was).
    """

    work_dir: Path
    keep: int
    kept: tuple[Path, ...]
    in_use: tuple[Path, ...]
    removed: tuple[Path, ...]
    failed: tuple[tuple[Path, str], ...]
    confirmed: bool


def _run_directories(work_dir: Path) -> list[Path]:
    """The run directories in ``work_dir``, newest first: real directories (no symlinks) named like a
    run, holding a regular marker file. Anything else is not ours and is never listed."""
    found = []
    try:
        entries = list(os.scandir(work_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not _RUN_NAME.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            marker = os.lstat(os.path.join(entry.path, RUN_MARKER))
        except OSError:
            continue
        if stat.S_ISREG(marker.st_mode):
            found.append(Path(entry.path))
    return sorted(found, key=lambda p: p.name, reverse=True)


def prune_working_copies(work_dir: Path, keep: int, *, confirm: bool = False) -> WorkingCopyPrune:
    """Keep the ``keep`` newest run directories of ``work_dir`` and remove the older ones.

    Only directories a run made are considered (name and marker, see :func:`claim_run_directory`);
    one whose marker is locked is in use by a run and is skipped, whatever its age. Without
    ``confirm`` nothing is removed: the result says what would be. A directory that cannot be removed
    is reported in ``failed``, the others are still removed.

    Raises:
        ValueError: ``keep`` is below 1 (the newest run directory holds the latest update's branch).
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    directories = _run_directories(work_dir)
    in_use: list[Path] = []
    removed: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for path in directories[keep:]:
        try:
            descriptor = os.open(path / RUN_MARKER, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            failed.append((path, f"cannot open its marker: {exc.strerror}"))
            continue
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                in_use.append(path)
                continue
            # Removed while the lock is held, so no run can take the directory up meanwhile.
            if confirm:
                try:
                    shutil.rmtree(path)
                except OSError as exc:
                    failed.append((path, f"{exc.strerror or exc} ({exc.filename})"))
                    continue
            removed.append(path)
        finally:
            os.close(descriptor)
    if removed and confirm:
        run_logger(__name__).info("removed %d old working cop(ies) from %s", len(removed), work_dir)
    return WorkingCopyPrune(
        work_dir, keep, tuple(directories[:keep]), tuple(in_use), tuple(removed), tuple(failed), confirm
    )
