"""Loading the settings, and the one error message that names each bad value, its source and an
example of a valid value."""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import SettingsError as PydanticSettingsError

from tasks.errors import SettingsError
from tasks.secrets import mask_url
from tasks.settings.base import CONFIG_ENV, DEFAULT_CONFIG_FILE, ENV_PREFIX, is_ambiguous_url
from tasks.settings.model import OpsSettings
from tasks.settings.names import SettingField, _closest, setting_fields, unknown_variables


def _source_of(loc: tuple[Any, ...]) -> str:
    """Say where the value at ``loc`` came from: an environment variable, the TOML file, or a default."""
    path = [str(part) for part in loc if not isinstance(part, int)]
    if not path:
        return "settings"
    env_name = ENV_PREFIX + "__".join(p.upper() for p in path)
    if env_name in os.environ:
        return f"environment variable {env_name}"
    # A whole section may come as JSON in one variable (OPS_HEALTH='{"urls": [...]}').
    for depth in range(len(path) - 1, 0, -1):
        name = ENV_PREFIX + "__".join(p.upper() for p in path[:depth])
        if name in os.environ:
            return f"environment variable {name}"
    config = os.environ.get(CONFIG_ENV) or (
        DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).is_file() else None
    )
    if config:
        line = _toml_line(Path(config), path)
        where = f", line {line}" if line else ""
        return f"config file {config} ([{'.'.join(path[:-1]) or 'top level'}] {path[-1]}{where})"
    return "embedded default"


def _toml_line(config: Path, path: Sequence[str]) -> int | None:
    """The line of ``path``'s key in a TOML file (plain ``[a.b]`` tables and ``key =`` lines)."""
    try:
        text = config.read_text()
    except OSError:
        return None
    table: tuple[str, ...] = ()
    want_table, key = tuple(path[:-1]), path[-1]
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9_.\- ]+?)\s*\]", line)
        if header:
            table = tuple(part.strip() for part in header.group(1).split("."))
        elif table == want_table and re.match(rf"{re.escape(key)}\s*=", line):
            return number
    return None


def _shown_value(loc: tuple[Any, ...], value: Any) -> str:
    secret_names = {"dsn", "url", "password", "secret_access_key", "access_key_id", "token"}
    secret_names.add("replication_dsn")
    if loc and str(loc[-1]) in secret_names and isinstance(value, str):
        if is_ambiguous_url(value):
            # Where the password ends cannot be told: show nothing of what follows the scheme.
            return repr(value.partition("://")[0] + "://***")
        return repr(mask_url(value))
    if isinstance(value, SecretStr):
        return "'**********'"
    shown = repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


# --- examples of valid values -----------------------------------------------------------------------


def _field_at(loc: Sequence[Any]) -> SettingField | None:
    path = tuple(str(p) for p in loc if not isinstance(p, int))
    for candidate in setting_fields():
        if candidate.path == path:
            return candidate
    return None


def _placeholder(annotation: Any) -> Any:
    """A value of ``annotation``'s type, for fields whose default says nothing (None, empty)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (list, tuple, set, frozenset):
        return [_placeholder(args[0]) if args else "item"]
    if origin is dict:
        return {"key": _placeholder(args[1]) if len(args) == 2 else "value"}
    if origin is Literal:
        return typing.get_args(annotation)[0]
    if args and origin is not None:  # X | None and the like
        return _placeholder(args[0])
    for kind, value in ((bool, True), (int, 10), (float, 1.5), (Path, "/srv/path"), (SecretStr, "secret")):
        if annotation is kind:
            return value
    return "text"


def example_value(setting: SettingField) -> str:
    """A valid value of ``setting`` as an environment variable takes it (JSON for lists and maps)."""
    info = setting.field
    if info.examples:
        value: Any = info.examples[0]
    else:
        value = info.get_default(call_default_factory=True)
        if isinstance(value, SecretStr):
            # An embedded default is no secret; shown masked all the same, as every URL is.
            value = mask_url(value.get_secret_value())
        if value is None or value == [] or value == {}:
            value = _placeholder(info.annotation)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _example_line(loc: Sequence[Any]) -> str:
    setting = _field_at(loc)
    if setting is None or setting.section:
        return ""
    value = example_value(setting)
    quoted = f"'{value}'" if any(c in value for c in ' []{}""') else value
    return f" (for example {setting.env}={quoted})"


# --- loading ------------------------------------------------------------------------------------------


def _parse_error_lines(exc: PydanticSettingsError) -> list[str]:
    """pydantic-settings could not parse a variable (JSON expected): name it and show the form."""
    field = re.search(r'field "([^"]+)"', str(exc))
    section = field.group(1) if field else ""
    lines = []
    for variable in sorted(os.environ):
        name = variable.upper()
        if not name.startswith(f"{ENV_PREFIX}{section.upper()}"):
            continue
        setting = _field_at(tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__")))
        if setting is None:
            continue
        try:
            json.loads(os.environ[variable])
        except ValueError:
            value = _shown_value(setting.path, os.environ[variable])
            lines.append(
                f"- {'.'.join(setting.path)} = {value} from environment variable {variable}:"
                f" not valid JSON; lists, maps and sections are written as JSON"
                f"{_example_line(setting.path)}"
            )
    fallback = f"- {exc}; lists, maps and sections are written as JSON, e.g. OPS_QUEUE__NAMES='[\"a\"]'"
    return lines or [fallback]


def load_settings(**overrides: Any) -> OpsSettings:
    """Load and validate the settings.

    Args:
        overrides: values that win over every other source (tests, and flows that take a settings
            section as a parameter).

    Returns:
        The frozen settings.

    Raises:
        SettingsError: an ``OPS_`` variable or TOML key names no setting, the TOML file does not parse,
            or a value is missing, malformed, of the wrong type or out of range. The one message names
            each problem, its (masked) value and its source (variable, or file and key/line), the closest
            valid name where one was mistyped, and an example of a valid value. Raised before anything
            is done.
    """
    unknown = unknown_variables(os.environ)
    if unknown:
        raise SettingsError(_INVALID + "\n".join(unknown))
    try:
        return OpsSettings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        config = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_FILE
        raise SettingsError(
            _INVALID + f"- config file {config} is not valid TOML: {exc}. Strings are quoted"
            ' (dsn = "postgresql://app@db:5432/app"), lists are ["a", "b"], sections are [name]'
        ) from None
    except PydanticSettingsError as exc:
        raise SettingsError(_INVALID + "\n".join(_parse_error_lines(exc))) from None
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            field = ".".join(str(p) for p in loc) or "settings"
            if error["type"] == "extra_forbidden":
                lines.append(f"- {field} from {_source_of(loc)} names no setting; {_sibling_hint(loc)}")
                continue
            message = str(error["msg"]).removeprefix("Value error, ")
            value = _shown_value(loc, error.get("input"))
            lines.append(f"- {field} = {value} from {_source_of(loc)}: {message}{_example_line(loc)}")
        raise SettingsError(_INVALID + "\n".join(lines)) from None


_INVALID = "invalid settings; nothing was done. Fix these values and run again:\n"


def _sibling_hint(loc: tuple[Any, ...]) -> str:
    parent = tuple(str(p) for p in loc[:-1])
    siblings = [f.path[-1] for f in setting_fields() if f.path[:-1] == parent]
    guess = _closest(str(loc[-1]), siblings)
    return f"did you mean {guess}?" if guess else "see the settings table in the README"
