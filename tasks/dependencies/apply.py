"""Applying an update in the working copy: the plan's npm commands, the app's tests, the commit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.commands import run_command
from tasks.dependencies.environment import LOCKFILES, NpmEnvironment
from tasks.dependencies.lockfile import LockChange, diff_lockfiles, lockfile_sha, read_lockfile
from tasks.dependencies.planning import UpdatePlan
from tasks.dependencies.working_copy import WorkingCopy


@dataclass(frozen=True)
class UpdateResult:
    """What an applied update changed: the lockfile diff and the commands run (masked)."""

    scope: str
    commands: tuple[str, ...]
    changes: tuple[LockChange, ...]
    lockfile_sha_before: str
    lockfile_sha_after: str

    @property
    def changed(self) -> bool:
        return self.lockfile_sha_before != self.lockfile_sha_after


def apply_updates(npm: NpmEnvironment, wc: WorkingCopy, plan: UpdatePlan) -> UpdateResult:
    """Run the plan's npm commands in the working copy and capture the lockfile diff."""
    before_sha = lockfile_sha(wc.lockfile_path)
    before = read_lockfile(wc.lockfile_path)
    commands = []
    for action in plan.actions:
        result = npm.npm(list(action.args), wc.path, npm.settings.install_timeout_seconds)
        commands.append(result.command_line)
    after = read_lockfile(wc.lockfile_path)
    changes = tuple(diff_lockfiles(before, after))
    return UpdateResult(plan.scope, tuple(commands), changes, before_sha, lockfile_sha(wc.lockfile_path))


@dataclass(frozen=True)
class TestRun:
    """The application's test command on the updated tree."""

    __test__ = False  # not a pytest test class

    command: str
    returncode: int
    output: str
    duration_seconds: float

    @property
    def passed(self) -> bool:
        return self.returncode == 0


def run_tests(npm: NpmEnvironment, wc: WorkingCopy) -> TestRun:
    """Run the configured test argv in the working copy; a failure is returned, not raised."""
    result = run_command(
        npm.settings.test_argv,
        cwd=wc.path,
        env=npm.env,
        secrets=npm.secrets,
        timeout=npm.settings.test_timeout_seconds,
        check=False,
    )
    output = "\n".join(part for part in (result.stdout, result.stderr) if part)
    return TestRun(result.command_line, result.returncode, output[-8000:], result.duration_seconds)


@dataclass(frozen=True)
class CommitRecord:
    """The commit holding the update, on its branch in the working copy."""

    repository: Path
    branch: str
    commit: str
    files: tuple[str, ...]
    changed: bool


def commit_update(npm: NpmEnvironment, wc: WorkingCopy, message: str) -> CommitRecord:
    """Commit package.json and the lockfile on a new branch ``wc.branch`` (nothing else is staged).

    The branch is created here, with the commit: when nothing changed there is no commit and no branch.
    """
    files = [name for name in ("package.json", *LOCKFILES) if (wc.path / name).is_file()]
    npm.git(["add", "--", *files], wc.path)
    staged = npm.git(["diff", "--cached", "--name-only"], wc.path).stdout.split()
    if staged:
        npm.git(["checkout", "--quiet", "-b", wc.branch], wc.path)
        npm.git(["commit", "--quiet", "--message", message], wc.path)
    commit = npm.git(["rev-parse", "HEAD"], wc.path).stdout.strip()
    return CommitRecord(wc.path, wc.branch, commit, tuple(staged), bool(staged))
