"""The names that exist: every setting of the model, and the ``OPS_`` variables that name none."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tasks.settings.base import CONFIG_ENV, ENV_PREFIX
from tasks.settings.model import OpsSettings

# OPS_ variables that are not settings: the config file's name, and the test suite's own knobs.
RESERVED_VARIABLES = frozenset({CONFIG_ENV})
RESERVED_PREFIXES = ("OPS_TEST_",)


@dataclass(frozen=True)
class SettingField:
    """One setting of the model: its path, its field and whether it is a section or an open map."""

    path: tuple[str, ...]
    field: FieldInfo
    section: bool

    @property
    def env(self) -> str:
        """Its environment variable (``OPS_POSTGRES__DSN``)."""
        return ENV_PREFIX + "__".join(p.upper() for p in self.path)

    @property
    def open_map(self) -> bool:
        """A ``dict`` setting: variables below it (``OPS_X__Y__ANYKEY``) are its keys."""
        return typing.get_origin(self.field.annotation) is dict


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (``X`` or ``X | None``); None for a value (``list[X]`` is a value)."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    candidates = typing.get_args(annotation) if is_union else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def setting_fields(model: type[BaseModel] = OpsSettings, prefix: tuple[str, ...] = ()) -> list[SettingField]:
    """Every section and every setting of ``model``, depth first, in declaration order."""
    found: list[SettingField] = []
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        section = _section_type(info.annotation)
        found.append(SettingField(path, info, section is not None))
        if section is not None:
            found.extend(setting_fields(section, path))
    return found


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``OPS_`` variable that names no setting, with the closest valid name."""
    fields = setting_fields()
    known = {f.env for f in fields}
    open_maps = [f.env + "__" for f in fields if f.open_map]
    leaves = [f.env for f in fields if not f.section]
    lines = []
    for variable in sorted(environ):
        name = variable.upper()
        reserved = name in RESERVED_VARIABLES or name.startswith(RESERVED_PREFIXES)
        if not name.startswith(ENV_PREFIX) or reserved:
            continue
        if name in known or name.startswith(tuple(open_maps)):
            continue
        guess = _closest(name, leaves) or _closest(name, known)
        hint = f"did you mean {guess}?" if guess else "see the settings table in the README"
        lines.append(f"- environment variable {variable} names no setting; {hint}")
    return lines
