"""What every settings module shares: the variable prefix, the config file's name, the base of every
section, and the check that a URL reads the same to every parser."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

ENV_PREFIX = "OPS_"
CONFIG_ENV = "OPS_CONFIG"
DEFAULT_CONFIG_FILE = "ops.toml"


_ENCODE_HINT = (
    "does not parse unambiguously: percent-encode special characters in the user name and password"
    " (@ as %40, / as %2F, # as %23, ? as %3F, : in the user name as %3A),"
    " e.g. postgresql://app:pass%40word@db:5432/app"
)


def is_ambiguous_url(raw: str) -> bool:
    """Whether ``raw`` reads differently to different URL parsers (an unencoded ``@``, ``/``, ``#`` or
    ``?`` in the user name or password): libpq and Python's urlsplit would then disagree about the host,
    and the password's tail would show up as a host name in errors."""
    _, sep, rest = raw.partition("://")
    if not sep:
        return False
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    return authority.count("@") > 1 or "@" in tail


class _Section(BaseModel):
    """Base of every settings section: frozen, and unknown keys are errors (a typo must not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
