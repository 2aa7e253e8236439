"""npm dependency updates as plain functions: audit, outdated, working copy, update, test, commit.

Everything happens in a working copy made from the application's live checkout (a ``git clone`` of it,
or a copy plus ``git init`` when it is not a repository); the live checkout is only read. npm runs with
a userconfig of our own in the run directory (never the operator's ``~/.npmrc``): the registry URL and
its token come from settings, the token through an environment variable, so it is masked in every log,
record and error. Every command runs through :mod:`tasks.commands` with its own timeout.

Scopes:

- ``security``: only what fixes advisories: each vulnerable direct dependency goes to the lowest
  published version outside every advisory range (``npm install pkg@version``); vulnerable transitive
  packages move within their dependents' ranges (``npm update pkg``);
- ``minor``: ``npm update`` (everything within the ranges package.json allows);
- ``latest``: ``npm install pkg@<latest>`` for every outdated direct dependency (major bumps included).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from tasks.commands import CommandResult, run_command
from tasks.errors import CheckFailed, CommandError, OpsError, ParameterError
from tasks.runlog import run_logger
from tasks.settings import DependenciesSettings

Scope = Literal["security", "minor", "latest"]
SCOPES: tuple[str, ...] = ("security", "minor", "latest")
SEVERITIES: tuple[str, ...] = ("critical", "high", "moderate", "low", "info")
LOCKFILES: tuple[str, ...] = ("package-lock.json", "npm-shrinkwrap.json")
TOKEN_ENV = "NPM_REGISTRY_TOKEN"  # noqa: S105 - the name of the variable, not a token


class DependencyError(OpsError):
    """npm or git could not do what the update needs; the message says which step and what to do."""


class TestsFailed(CheckFailed):
    """The application's tests failed on the updated dependencies; nothing was built or deployed."""

    __test__ = False  # not a pytest test class


# --------------------------------------------------------------------------------------------------
# npm environment


@dataclass(frozen=True)
class NpmEnvironment:
    """How npm and git run for one update: variables, secrets to mask, timeouts, git identity."""

    env: dict[str, str] = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)
    settings: DependenciesSettings

    def npm(self, args: Sequence[str], cwd: Path, timeout: float, *, check: bool = True) -> CommandResult:
        return run_command(
            ["npm", *args], cwd=cwd, env=self.env, secrets=self.secrets, timeout=timeout, check=check
        )

    def git(self, args: Sequence[str], cwd: Path | None, *, check: bool = True) -> CommandResult:
        identity = [
            "-c",
            f"user.name={self.settings.git_author_name}",
            "-c",
            f"user.email={self.settings.git_author_email}",
            "-c",
            "commit.gpgsign=false",
        ]
        return run_command(
            ["git", *identity, *args],
            cwd=cwd,
            env={"GIT_TERMINAL_PROMPT": "0"},
            timeout=self.settings.git_timeout_seconds,
            check=check,
        )


def npm_environment(settings: DependenciesSettings, run_dir: Path) -> NpmEnvironment:
    """Write the run's own npm userconfig into ``run_dir`` and return the environment that uses it.

    The token is never written to disk: the userconfig refers to ``${NPM_REGISTRY_TOKEN}``, which npm
    expands from the environment (and the command runner masks, as its name says TOKEN).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    env = {
        "npm_config_userconfig": str(run_dir / "npmrc"),
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        # Installs do not audit on their own: the audit is an explicit, reported step.
        "npm_config_audit": "false",
        "npm_config_yes": "false",
    }
    secrets: list[str] = []
    if settings.registry_url:
        url = settings.registry_url if settings.registry_url.endswith("/") else settings.registry_url + "/"
        lines.append(f"registry={url}")
        # The environment beats a project .npmrc, so the configured registry wins over a committed one.
        env["npm_config_registry"] = url
        if settings.registry_token is not None:
            parts = urlsplit(url)
            lines.append(f"//{parts.netloc}{parts.path}:_authToken=${{{TOKEN_ENV}}}")
            token = settings.registry_token.get_secret_value()
            env[TOKEN_ENV] = token
            secrets.append(token)
    if settings.npm_cache_dir is not None:
        env["npm_config_cache"] = str(settings.npm_cache_dir)
    (run_dir / "npmrc").write_text("\n".join(lines) + "\n")
    return NpmEnvironment(env=env, secrets=tuple(secrets), settings=settings)


# --------------------------------------------------------------------------------------------------
# versions and ranges (the subset of node-semver that advisory ranges use)

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_COMPARATOR = re.compile(r"(<=|>=|<|>|=|\^|~)?\s*v?([0-9xX*]+(?:\.[0-9xX*]+){0,2}(?:-[0-9A-Za-z.-]+)?)")


def parse_version(text: str) -> tuple[int, int, int, tuple[Any, ...]] | None:
    """``"1.2.3-rc.1"`` -> ``(1, 2, 3, (0, "rc", 1))``; a release sorts after its prereleases."""
    match = _VERSION.match(text.strip())
    if not match:
        return None
    major, minor, patch, pre = match.groups()
    if pre is None:
        return int(major), int(minor), int(patch), (1,)
    parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return int(major), int(minor), int(patch), (0, *parts)


def _partial(text: str) -> list[int | None]:
    parts: list[int | None] = [
        None if p in {"x", "X", "*"} else int(p) for p in text.split("-")[0].split(".")
    ]
    return parts + [None] * (3 - len(parts))


def _bounds(op: str, text: str) -> list[tuple[str, tuple[Any, ...]]]:
    """One comparator as a list of (operator, version) checks that must all hold."""
    major, minor, patch = _partial(text)
    full = parse_version(text) if patch is not None else None
    if major is None:
        return []
    lo = (major, minor or 0, patch or 0, ())
    if op in {"", "="} and full is not None:
        return [("=", full)]
    if op in {"", "="}:  # x-range: 1.x, 1.2.x
        hi = (major + 1, 0, 0, ()) if minor is None else (major, minor + 1, 0, ())
        return [(">=", lo), ("<", hi)]
    if op == "^":
        if major > 0 or minor is None:
            hi = (major + 1, 0, 0, ())
        elif minor > 0 or patch is None:
            hi = (0, minor + 1, 0, ())
        else:
            hi = (0, 0, (patch or 0) + 1, ())
        return [(">=", full or lo), ("<", hi)]
    if op == "~":
        hi = (major + 1, 0, 0, ()) if minor is None else (major, minor + 1, 0, ())
        return [(">=", full or lo), ("<", hi)]
    if full is None:
        # "<1.2" means below 1.2.0; ">1.2" means 1.3.0 and up; "<=1.2" means below 1.3.0.
        if op in {"<", ">="}:
            return [(op, lo)]
        hi = (major + 1, 0, 0, ()) if minor is None else (major, minor + 1, 0, ())
        return [("<", hi)] if op == "<=" else [(">=", hi)]
    return [(op, full)]


def _holds(version: tuple[Any, ...], op: str, bound: tuple[Any, ...]) -> bool:
    return {
        "=": version == bound,
        "<": version < bound,
        "<=": version <= bound,
        ">": version > bound,
        ">=": version >= bound,
    }[op]


def satisfies(version: str, range_text: str) -> bool:
    """Whether ``version`` is in the npm range ``range_text`` (comparators, x-ranges, ^, ~, hyphens, ||).

    A range this cannot read counts as matching, so an advisory is never silently ignored.
    """
    parsed = parse_version(version)
    if parsed is None:
        return False
    for alternative in range_text.split("||"):
        text = alternative.strip()
        if text in {"", "*", "x", "latest"}:
            return True
        hyphen = re.fullmatch(r"(\S+)\s+-\s+(\S+)", text)
        if hyphen:
            text = f">={hyphen.group(1)} <={hyphen.group(2)}"
        checks: list[tuple[str, tuple[Any, ...]]] = []
        position = 0
        readable = True
        while position < len(text):
            if text[position].isspace():
                position += 1
                continue
            match = _COMPARATOR.match(text, position)
            if not match:
                readable = False
                break
            checks.extend(_bounds(match.group(1) or "", match.group(2)))
            position = match.end()
        if not readable:
            return True
        if all(_holds(parsed, op, bound) for op, bound in checks):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# audit and outdated


@dataclass(frozen=True)
class Advisory:
    """One advisory against one package."""

    id: str
    package: str
    title: str
    severity: str
    url: str | None
    vulnerable_range: str

    @property
    def key(self) -> tuple[str, str]:
        return self.package, self.id


@dataclass(frozen=True)
class VulnerablePackage:
    """A package npm audit flags: its own advisories, or vulnerable through a dependency."""

    name: str
    severity: str
    is_direct: bool
    nodes: tuple[str, ...]
    advisories: tuple[Advisory, ...]
    via_packages: tuple[str, ...]
    fix_available: bool
    fix_is_major: bool = False


@dataclass(frozen=True)
class AuditReport:
    """``npm audit --json`` parsed: vulnerable packages and the advisories behind them."""

    packages: tuple[VulnerablePackage, ...]
    counts: Mapping[str, int]

    @property
    def advisories(self) -> list[Advisory]:
        seen: dict[tuple[str, str], Advisory] = {}
        for package in self.packages:
            for advisory in package.advisories:
                seen.setdefault(advisory.key, advisory)
        return sorted(seen.values(), key=lambda a: (SEVERITIES.index(a.severity), a.package, a.id))

    def by_severity(self) -> dict[str, int]:
        counts = dict.fromkeys(SEVERITIES, 0)
        for advisory in self.advisories:
            counts[advisory.severity] = counts.get(advisory.severity, 0) + 1
        return counts

    def package(self, name: str) -> VulnerablePackage | None:
        return next((p for p in self.packages if p.name == name), None)


def _severity(value: Any) -> str:
    text = str(value or "info").lower()
    return text if text in SEVERITIES else "info"


def parse_audit(data: Mapping[str, Any]) -> AuditReport:
    """Parse npm's audit report (version 2, npm 7 and later).

    Raises:
        DependencyError: npm answered with an error instead of a report (registry without an audit
            endpoint, network, lockfile problems).
    """
    if "error" in data:
        error = data["error"]
        summary = error.get("summary") if isinstance(error, Mapping) else str(error)
        raise DependencyError(
            f"npm audit failed: {summary}; check that the registry serves /-/npm/v1/security/advisories/bulk"
        )
    if data.get("auditReportVersion") != 2:
        raise DependencyError(
            "npm audit answered in an unknown format (auditReportVersion "
            f"{data.get('auditReportVersion')!r}); use npm 7 or later"
        )
    packages = []
    for name, entry in (data.get("vulnerabilities") or {}).items():
        advisories = []
        via_packages = []
        for via in entry.get("via") or []:
            if isinstance(via, Mapping):
                advisories.append(
                    Advisory(
                        id=str(via.get("source") or via.get("url") or via.get("title")),
                        package=str(via.get("name") or name),
                        title=str(via.get("title") or ""),
                        severity=_severity(via.get("severity")),
                        url=via.get("url"),
                        vulnerable_range=str(via.get("range") or "*"),
                    )
                )
            else:
                via_packages.append(str(via))
        fix = entry.get("fixAvailable")
        packages.append(
            VulnerablePackage(
                name=name,
                severity=_severity(entry.get("severity")),
                is_direct=bool(entry.get("isDirect")),
                nodes=tuple(entry.get("nodes") or ()),
                advisories=tuple(advisories),
                via_packages=tuple(via_packages),
                fix_available=bool(fix),
                fix_is_major=bool(isinstance(fix, Mapping) and fix.get("isSemVerMajor")),
            )
        )
    counts = dict((data.get("metadata") or {}).get("vulnerabilities") or {})
    return AuditReport(tuple(sorted(packages, key=lambda p: p.name)), counts)


def _json_output(result: CommandResult, what: str) -> Any:
    text = result.stdout.strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DependencyError(
            f"{what} printed no JSON (exit {result.returncode}):\n{(result.stderr or text)[-2000:]}"
        ) from None


def audit(npm: NpmEnvironment, cwd: Path) -> AuditReport:
    """Run ``npm audit --json`` in ``cwd`` (exit 1 only means advisories were found)."""
    result = npm.npm(["audit", "--json"], cwd, npm.settings.audit_timeout_seconds, check=False)
    report = parse_audit(_json_output(result, "npm audit --json"))
    run_logger(__name__).info(
        "npm audit: %s",
        ", ".join(f"{k} {v}" for k, v in report.by_severity().items() if v) or "no advisories",
    )
    return report


@dataclass(frozen=True)
class OutdatedPackage:
    """One row of ``npm outdated``: installed, wanted (within range) and latest versions."""

    name: str
    current: str | None
    wanted: str | None
    latest: str | None
    dependent: str | None = None


def parse_outdated(data: Mapping[str, Any]) -> list[OutdatedPackage]:
    """Parse ``npm outdated --json`` (a dict of package -> entry, or a list of entries per location)."""
    rows = []
    for name, entry in data.items():
        for item in entry if isinstance(entry, list) else [entry]:
            rows.append(
                OutdatedPackage(
                    name=name,
                    current=item.get("current"),
                    wanted=item.get("wanted"),
                    latest=item.get("latest"),
                    dependent=item.get("dependent"),
                )
            )
    return sorted(rows, key=lambda r: r.name)


def outdated(npm: NpmEnvironment, cwd: Path) -> list[OutdatedPackage]:
    """Run ``npm outdated --json`` in ``cwd`` (exit 1 only means something is outdated)."""
    result = npm.npm(["outdated", "--json"], cwd, npm.settings.audit_timeout_seconds, check=False)
    data = _json_output(result, "npm outdated --json")
    if isinstance(data, Mapping) and "error" in data:
        raise DependencyError(f"npm outdated failed: {data['error']}")
    return parse_outdated(data)


def published_versions(npm: NpmEnvironment, cwd: Path, name: str) -> list[str]:
    """Every published version of ``name`` (``npm view NAME versions --json``)."""
    result = npm.npm(["view", name, "versions", "--json"], cwd, npm.settings.audit_timeout_seconds)
    data = _json_output(result, f"npm view {name} versions")
    return [data] if isinstance(data, str) else list(data)


# --------------------------------------------------------------------------------------------------
# working copy


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
    source_commit = None
    if (source / ".git").exists():
        source_commit = npm.git(
            ["-c", f"safe.directory={source}", "-C", str(source), "rev-parse", "HEAD"], None
        ).stdout.strip()
        npm.git(
            [
                "-c",
                f"safe.directory={source}",
                "clone",
                "--quiet",
                "--no-hardlinks",
                "--",
                str(source),
                str(dest),
            ],
            None,
        )
    else:
        shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("node_modules", ".git"))
        npm.git(["init", "--quiet"], dest)
        npm.git(["add", "--all"], dest)
        npm.git(["commit", "--quiet", "--message", f"Baseline: copy of {source}"], dest)
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


# --------------------------------------------------------------------------------------------------
# lockfile


def read_lockfile(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, json.JSONDecodeError) as exc:
        raise DependencyError(f"cannot read {path}: {exc}; run `npm install` to regenerate it") from None


def lockfile_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _name_from_path(path: str) -> str:
    return path.rsplit("node_modules/", 1)[-1]


def lock_packages(lock: Mapping[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Install path -> (package name, version) for lockfile versions 1, 2 and 3."""
    result: dict[str, tuple[str, str | None]] = {}
    packages = lock.get("packages")
    if isinstance(packages, Mapping):
        for path, entry in packages.items():
            if not path:
                continue  # the project itself
            name = entry.get("name") or _name_from_path(path)
            result[path] = (name, entry.get("version"))
        return result

    def walk(deps: Mapping[str, Any], prefix: str) -> None:
        for name, entry in deps.items():
            path = f"{prefix}node_modules/{name}"
            result[path] = (name, entry.get("version"))
            walk(entry.get("dependencies") or {}, path + "/")

    walk(lock.get("dependencies") or {}, "")
    return result


@dataclass(frozen=True)
class LockChange:
    """One package at one install path whose version the update changed."""

    path: str
    name: str
    before: str | None
    after: str | None

    @property
    def kind(self) -> str:
        if self.before is None:
            return "added"
        if self.after is None:
            return "removed"
        return "changed"


def diff_lockfiles(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[LockChange]:
    """package -> from -> to for every install path that was added, removed or changed."""
    old, new = lock_packages(before), lock_packages(after)
    changes = []
    for path in sorted(set(old) | set(new)):
        was, now = old.get(path), new.get(path)
        if was is not None and now is not None and was[1] == now[1]:
            continue
        name = (now or was or (path, None))[0]
        changes.append(LockChange(path, name, was[1] if was else None, now[1] if now else None))
    return changes


def installed_version(lock: Mapping[str, Any], name: str) -> str | None:
    """The version of the top-level install of ``name``."""
    entry = lock_packages(lock).get(f"node_modules/{name}")
    return entry[1] if entry else None


def direct_dependencies(package_json: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    for section in ("dependencies", "devDependencies", "optionalDependencies"):
        names.update((package_json.get(section) or {}).keys())
    return names


# --------------------------------------------------------------------------------------------------
# planning and applying updates


@dataclass(frozen=True)
class UpdateAction:
    """One npm command of an update and why it runs."""

    args: tuple[str, ...]
    packages: tuple[str, ...]
    reason: str

    @property
    def command_line(self) -> str:
        return "npm " + " ".join(self.args)


@dataclass(frozen=True)
class UpdatePlan:
    """What the scope asks for: npm commands, and advisories no published version fixes."""

    scope: str
    actions: tuple[UpdateAction, ...]
    unfixable: tuple[str, ...] = ()


def lowest_fixed_version(current: str | None, versions: Iterable[str], ranges: Sequence[str]) -> str | None:
    """The lowest stable version above ``current`` that is outside every vulnerable range."""
    floor = parse_version(current) if current else None
    candidates = []
    for version in versions:
        parsed = parse_version(version)
        if parsed is None or parsed[3] != (1,):
            continue  # prereleases are never chosen as fixes
        if floor is not None and parsed <= floor:
            continue
        if any(satisfies(version, r) for r in ranges):
            continue
        candidates.append((parsed, version))
    return min(candidates)[1] if candidates else None


def plan_updates(
    scope: str,
    report: AuditReport,
    stale: Sequence[OutdatedPackage],
    lock: Mapping[str, Any],
    package_json: Mapping[str, Any],
    versions_of: Callable[[str], list[str]],
) -> UpdatePlan:
    """The npm commands the scope needs; ``versions_of`` lists a package's published versions.

    Raises:
        ParameterError: unknown scope.
    """
    if scope not in SCOPES:
        raise ParameterError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if scope == "minor":
        return UpdatePlan(scope, (UpdateAction(("update",), (), "everything within package.json ranges"),))
    direct = direct_dependencies(package_json)
    if scope == "latest":
        moves = [p for p in stale if p.name in direct and p.latest and p.latest != p.current]
        if not moves:
            return UpdatePlan(scope, ())
        specs = tuple(f"{p.name}@{p.latest}" for p in moves)
        return UpdatePlan(
            scope,
            (UpdateAction(("install", *specs), tuple(p.name for p in moves), "latest published versions"),),
        )
    actions: list[UpdateAction] = []
    unfixable: list[str] = []
    transitive: list[str] = []
    for package in report.packages:
        if not package.advisories:
            continue  # vulnerable only through a dependency: that dependency's own fix moves it
        ranges = [a.vulnerable_range for a in package.advisories]
        ids = ", ".join(sorted({a.id for a in package.advisories}))
        if package.name not in direct:
            transitive.append(package.name)
            continue
        current = installed_version(lock, package.name)
        target = lowest_fixed_version(current, versions_of(package.name), ranges)
        if target is None:
            unfixable.append(f"{package.name}@{current}: no published version outside {' || '.join(ranges)}")
            continue
        actions.append(
            UpdateAction(
                ("install", f"{package.name}@{target}"),
                (package.name,),
                f"lowest version fixing advisory {ids}",
            )
        )
    if transitive:
        actions.append(
            UpdateAction(
                ("update", *transitive),
                tuple(transitive),
                "transitive packages with advisories, within ranges",
            )
        )
    return UpdatePlan(scope, tuple(actions), tuple(unfixable))


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


# --------------------------------------------------------------------------------------------------
# tests and commit


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
    """Commit package.json and the lockfile on the working copy's branch (nothing else is staged)."""
    files = [name for name in ("package.json", *LOCKFILES) if (wc.path / name).is_file()]
    npm.git(["add", "--", *files], wc.path)
    staged = npm.git(["diff", "--cached", "--name-only"], wc.path).stdout.split()
    if staged:
        npm.git(["commit", "--quiet", "--message", message], wc.path)
    commit = npm.git(["rev-parse", "HEAD"], wc.path).stdout.strip()
    return CommitRecord(wc.path, wc.branch, commit, tuple(staged), bool(staged))


# --------------------------------------------------------------------------------------------------
# comparing audits


@dataclass(frozen=True)
class AdvisoryDelta:
    """Advisories the update fixed and those still open."""

    fixed: tuple[Advisory, ...]
    remaining: tuple[Advisory, ...]
    introduced: tuple[Advisory, ...] = field(default=())

    def fixed_by_severity(self) -> dict[str, int]:
        counts = dict.fromkeys(SEVERITIES, 0)
        for advisory in self.fixed:
            counts[advisory.severity] += 1
        return counts


def compare_audits(before: AuditReport, after: AuditReport) -> AdvisoryDelta:
    """Which advisories the update fixed, which remain, and which it brought in."""
    old = {a.key: a for a in before.advisories}
    new = {a.key: a for a in after.advisories}
    return AdvisoryDelta(
        fixed=tuple(a for k, a in old.items() if k not in new),
        remaining=tuple(a for k, a in new.items() if k in old),
        introduced=tuple(a for k, a in new.items() if k not in old),
    )


def ensure_tools() -> None:
    """Fail before any side effect when npm or git is missing."""
    missing = [tool for tool in ("npm", "node", "git") if shutil.which(tool) is None]
    if missing:
        raise CommandError(f"{', '.join(missing)} not found on PATH; install Node.js, npm and git")
