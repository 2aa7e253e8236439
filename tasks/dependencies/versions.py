"""Versions: the subset of node-semver that advisory ranges use, ``npm outdated`` and published versions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.dependencies.environment import DependencyError, NpmEnvironment, json_output

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_COMPARATOR = re.compile(r"(<=|>=|<|>|=|\^|~)?\s*v?([0-9xX*]+(?:\.[0-9xX*]+){0,2}(?:-[0-9A-Za-z.-]+)?)")

Check = tuple[str, tuple[Any, ...]]


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


def _bounds(op: str, text: str) -> list[Check]:
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


def _comparator_checks(text: str) -> list[Check] | None:
    """The checks of one ``||`` alternative (comparators or a hyphen range); None when unreadable."""
    hyphen = re.fullmatch(r"(\S+)\s+-\s+(\S+)", text)
    if hyphen:
        text = f">={hyphen.group(1)} <={hyphen.group(2)}"
    checks: list[Check] = []
    position = 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        match = _COMPARATOR.match(text, position)
        if not match:
            return None
        checks.extend(_bounds(match.group(1) or "", match.group(2)))
        position = match.end()
    return checks


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
        checks = _comparator_checks(text)
        if checks is None or all(_holds(parsed, op, bound) for op, bound in checks):
            return True
    return False


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
    data = json_output(result, "npm outdated --json")
    if isinstance(data, Mapping) and "error" in data:
        raise DependencyError(f"npm outdated failed: {data['error']}")
    return parse_outdated(data)


def published_versions(npm: NpmEnvironment, cwd: Path, name: str) -> list[str]:
    """Every published version of ``name`` (``npm view NAME versions --json``)."""
    result = npm.npm(["view", name, "versions", "--json"], cwd, npm.settings.audit_timeout_seconds)
    data = json_output(result, f"npm view {name} versions")
    return [data] if isinstance(data, str) else list(data)
