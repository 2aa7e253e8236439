"""The working copy: where an update is made, apart from the application's live checkout.

It is a ``git clone`` of the live checkout, or a copy plus ``git init`` when that is not a repository;
the live checkout is only read.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.commands import CommandResult
from tasks.dependencies.environment import LOCKFILES, DependencyError, NpmEnvironment
from tasks.errors import ParameterError
from tasks.runlog import run_logger


@dataclass(frozen=True)
class WorkingCopy:
    """Where the update is made: a git repository separate from the live checkout."""

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
    """Make ``dest`` a working copy of ``source`` on a new ``branch``, without writing to ``source``.

    A git checkout is cloned (its committed state: what is deployed); any other directory is copied
    (without node_modules) and committed as the baseline of a new repository.

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
    npm.git(["checkout", "--quiet", "-b", branch], dest)
    base = npm.git(["rev-parse", "HEAD"], dest).stdout.strip()
    run_logger(__name__).info("working copy %s on branch %s from %s", dest, branch, source)
    return WorkingCopy(dest, source, branch, base, source_commit, lockfile)


def install(npm: NpmEnvironment, wc: WorkingCopy) -> CommandResult:
    """``npm ci``: install exactly what the lockfile says (the state the update starts from)."""
    return npm.npm(["ci"], wc.path, npm.settings.install_timeout_seconds)
