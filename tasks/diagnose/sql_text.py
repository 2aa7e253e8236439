"""Query text as reports show it: every string and number literal masked, so that a query's
parameters (customer data, tokens) never reach a report."""

from __future__ import annotations

import re

from tasks.secrets import one_line

_QUERY_TEXT_LIMIT = 500

_SQL_TOKEN = re.compile(
    r"""
      (?P<ident>"(?:[^"]|"")*"?)                                   # quoted identifier: kept
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*|)\$.*?(?:\$(?P=tag)\$|\Z))  # $$...$$, $x$...$x$
    | (?P<estr>[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z))                  # E'...' with backslash escapes
    | (?P<str>(?:[bBxXnN]|[uU]&)?'(?:[^']|'')*(?:'|\Z))          # '...', B'..', X'..', N'..', U&'..'
    | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))                     # comments: kept
    | (?P<word>[A-Za-z_\x80-\uffff][A-Za-z_0-9$\x80-\uffff]*)    # keywords, names (t1, col2): kept
    | (?P<param>\$\d+)                                           # placeholders: kept
    | (?P<num>0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+
        |(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)      # numeric literals
    """,
    re.VERBOSE | re.DOTALL,
)


def mask_sql_literals(query: str) -> str:
    """``query`` with every string and number literal replaced (``'?'`` and ``?``).

    Strings in any form (standard, ``E''``, dollar-quoted, bit/hex) become ``'?'``; numbers become
    ``?``; identifiers (also quoted ones, and names with digits such as ``t1``), keywords, ``$1``
    placeholders and comments are kept. A literal cut off by PostgreSQL's
    ``track_activity_query_size`` is masked to the end.
    """

    def replace(match: re.Match[str]) -> str:
        kind = match.lastgroup
        if kind == "tag":  # pragma: no cover - the tag group only occurs inside "dollar"
            kind = "dollar"
        if kind in {"dollar", "estr", "str"}:
            return "'?'"
        if kind == "num":
            return "?"
        return match.group(0)

    return _SQL_TOKEN.sub(replace, query)


def shown_query(query: str | None) -> str:
    """A query as reports show it: literals masked, whitespace folded, cut to a readable length."""
    return one_line(mask_sql_literals(query or ""), _QUERY_TEXT_LIMIT)
