"""Advisories: ``npm audit`` parsed into packages and advisories, and two audits compared."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.dependencies.environment import SEVERITIES, DependencyError, NpmEnvironment, json_output
from tasks.runlog import run_logger


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


def _vulnerable_package(name: str, entry: Mapping[str, Any]) -> VulnerablePackage:
    """One entry of the report's ``vulnerabilities``: ``via`` holds advisories and package names."""
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
    return VulnerablePackage(
        name=name,
        severity=_severity(entry.get("severity")),
        is_direct=bool(entry.get("isDirect")),
        nodes=tuple(entry.get("nodes") or ()),
        advisories=tuple(advisories),
        via_packages=tuple(via_packages),
        fix_available=bool(fix),
        fix_is_major=bool(isinstance(fix, Mapping) and fix.get("isSemVerMajor")),
    )


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
    vulnerabilities = data.get("vulnerabilities") or {}
    packages = [_vulnerable_package(name, entry) for name, entry in vulnerabilities.items()]
    counts = dict((data.get("metadata") or {}).get("vulnerabilities") or {})
    return AuditReport(tuple(sorted(packages, key=lambda p: p.name)), counts)


def audit(npm: NpmEnvironment, cwd: Path) -> AuditReport:
    """Run ``npm audit --json`` in ``cwd`` (exit 1 only means advisories were found)."""
    result = npm.npm(["audit", "--json"], cwd, npm.settings.audit_timeout_seconds, check=False)
    report = parse_audit(json_output(result, "npm audit --json"))
    run_logger(__name__).info(
        "npm audit: %s",
        ", ".join(f"{k} {v}" for k, v in report.by_severity().items() if v) or "no advisories",
    )
    return report


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
