"""The checks of a data recovery: validation queries run read-only after the restore, and the
settings the incident flows refuse before any side effect."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from tasks import postgres
from tasks.errors import SettingsError
from tasks.reports import elapsed_ms
from tasks.secrets import safe_error
from tasks.settings import OpsSettings


@dataclass(frozen=True)
class ValidationResult:
    """One validation query after a recovery."""

    query: str
    ok: bool
    value: str | None
    error: str | None
    duration_ms: float


def run_validation_queries(settings: OpsSettings, queries: Sequence[str]) -> list[ValidationResult]:
    """Run each query in a read-only transaction under its own timeout.

    A query passes when it returns a row whose first column is not false, NULL or 0
    (``SELECT count(*) > 0 FROM users``, ``SELECT NOT EXISTS (SELECT ... orphans)``).
    """
    results = []
    timeout_ms = int(settings.incidents.validation_timeout_seconds * 1000)
    for query in queries:
        started = time.perf_counter()
        try:
            with postgres.connect(
                settings.postgres, autocommit=False, application_name="swagger2mcp-ops-validate"
            ) as conn:
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
                row = conn.execute(query).fetchone()
                conn.rollback()
        except psycopg.Error as exc:
            results.append(
                ValidationResult(query, False, None, safe_error(exc, settings.postgres), elapsed_ms(started))
            )
            continue
        value = None if row is None else row[0]
        ok = row is not None and value is not None and value is not False and value != 0
        error = None if ok else f"returned {'no row' if row is None else repr(value)}; expected a true value"
        results.append(
            ValidationResult(
                query, ok, None if value is None else str(value)[:200], error, elapsed_ms(started)
            )
        )
    return results


def require_settings(settings: OpsSettings) -> None:
    """Settings errors the incident flows check before any side effect."""
    for query in settings.incidents.validation_queries:
        if not query.strip():
            raise SettingsError("incidents.validation_queries holds an empty query; remove it")
