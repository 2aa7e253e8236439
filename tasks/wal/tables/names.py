"""The tables a per-table restore is asked for: names parsed as PostgreSQL reads them, and the side
schema's name.

A name is ``table``, ``schema.table`` or their double-quoted forms (an unquoted part is folded to lower
case, a quoted one kept as written); duplicates are removed and two tables of one name in different
schemas are refused, since they would meet in the one side schema. Nothing here connects anywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime

from tasks.errors import ParameterError


def _part(text: str, whole: str) -> str:
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return text[1:-1].replace('""', '"')
    if not text or '"' in text:
        raise ParameterError(f"{whole!r} is not a table name (schema.table or table); nothing was touched")
    return text.lower()  # as PostgreSQL folds an unquoted name


def parse_table(text: str) -> tuple[str, str]:
    """``table``, ``schema.table`` or their double-quoted forms, as (schema, table); ``public`` by default.

    Raises:
        ParameterError: empty or malformed.
    """
    raw = text.strip()
    if raw.startswith('"'):
        end = raw.find('"', 1)
        while end != -1 and raw[end : end + 2] == '""':
            end = raw.find('"', end + 2)
        first, rest = (raw[: end + 1], raw[end + 1 :]) if end != -1 else (raw, "")
    else:
        first, _, rest = raw.partition(".")
        rest = "." + rest if _ else ""
    if not rest:
        return "public", _part(first, text)
    if not rest.startswith(".") or len(rest) < 2:
        raise ParameterError(f"{text!r} is not a table name (schema.table or table); nothing was touched")
    return _part(first, text), _part(rest[1:], text)


def parse_tables(names: list[str]) -> tuple[tuple[str, str], ...]:
    """Every name parsed, duplicates removed, order kept.

    Raises:
        ParameterError: an empty list or a malformed name.
    """
    if not names:
        raise ParameterError("tables is empty: name at least one table, or leave it out; nothing was touched")
    parsed = tuple(dict.fromkeys(parse_table(n) for n in names))
    names_only = [t for _, t in parsed]
    twice = sorted({t for t in names_only if names_only.count(t) > 1})
    if twice:
        # They would meet in the one side schema.
        raise ParameterError(
            f"tables names {', '.join(twice)} in more than one schema: restore them in separate runs;"
            " nothing was touched"
        )
    return parsed


def side_schema_name(at: datetime | None = None) -> str:
    """``restored_<yyyymmddhhmmss>`` (UTC)."""
    return f"restored_{(at or datetime.now(UTC)):%Y%m%d%H%M%S}"
