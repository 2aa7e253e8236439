"""Planning an update: the npm commands each scope needs.

- ``security``: only what fixes advisories: each vulnerable direct dependency goes to the lowest
  published version outside every advisory range (``npm install pkg@version``); vulnerable transitive
  packages move within their dependents' ranges (``npm update pkg``);
- ``minor``: ``npm update`` (everything within the ranges package.json allows);
- ``latest``: ``npm install pkg@<latest>`` for every outdated direct dependency (major bumps included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.dependencies.advisories import AuditReport
from tasks.dependencies.environment import SCOPES, NpmEnvironment
from tasks.dependencies.lockfile import direct_dependencies, installed_version, read_lockfile
from tasks.dependencies.versions import OutdatedPackage, parse_version, published_versions, satisfies
from tasks.dependencies.working_copy import WorkingCopy
from tasks.errors import ParameterError


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


def _latest_plan(stale: Sequence[OutdatedPackage], direct: set[str]) -> UpdatePlan:
    """Every outdated direct dependency to its latest published version, in one ``npm install``."""
    moves = [p for p in stale if p.name in direct and p.latest and p.latest != p.current]
    if not moves:
        return UpdatePlan("latest", ())
    specs = tuple(f"{p.name}@{p.latest}" for p in moves)
    return UpdatePlan(
        "latest",
        (UpdateAction(("install", *specs), tuple(p.name for p in moves), "latest published versions"),),
    )


def _security_plan(
    report: AuditReport,
    lock: Mapping[str, Any],
    direct: set[str],
    versions_of: Callable[[str], list[str]],
) -> UpdatePlan:
    """The lowest fixing version of each vulnerable direct dependency; transitive ones within ranges."""
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
    return UpdatePlan("security", tuple(actions), tuple(unfixable))


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
        return _latest_plan(stale, direct)
    return _security_plan(report, lock, direct, versions_of)


def plan_for_scope(
    env: NpmEnvironment, wc: WorkingCopy, scope: str, report: AuditReport, stale: list[OutdatedPackage]
) -> UpdatePlan:
    """The scope's npm commands, from the audit, ``npm outdated`` and the published versions.

    Reads the working copy's lockfile and package.json, and asks the registry for a package's
    published versions only when the security scope needs them.

    Raises:
        ParameterError: unknown scope.
        DependencyError: the lockfile or package.json cannot be read, or ``npm view`` fails.
    """
    return plan_updates(
        scope,
        report,
        stale,
        read_lockfile(wc.lockfile_path),
        read_lockfile(wc.path / "package.json"),
        lambda name: published_versions(env, wc.path, name),
    )
