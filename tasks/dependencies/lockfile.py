"""The lockfile: reading it (versions 1, 2 and 3), its hash, and the diff an update made."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.dependencies.environment import DependencyError


def read_lockfile(path: Path) -> dict[str, Any]:
    """The JSON of ``path`` (a lockfile, or package.json).

    Raises:
        DependencyError: the file is missing or is not JSON.
    """
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, json.JSONDecodeError) as exc:
        raise DependencyError(f"cannot read {path}: {exc}; run `npm install` to regenerate it") from None


def lockfile_sha(path: Path) -> str:
    """The sha256 of the file's bytes, hex."""
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
    """The names package.json depends on directly (dependencies, dev and optional)."""
    names: set[str] = set()
    for section in ("dependencies", "devDependencies", "optionalDependencies"):
        names.update((package_json.get(section) or {}).keys())
    return names
