"""Protect patterns: files the cleanup never removes, matched fast enough to ask once per old file."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence


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
