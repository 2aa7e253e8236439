"""The checks of a data recovery: validation queries run read-only after the restore, and the
settings the incident flows refuse before any side effect."""

from __future__ import annotations

from collections.abc import Sequence

from tasks import postgres
from tasks.errors import SettingsError
from tasks.settings import OpsSettings

# A validation query's result: the project's one check-query result (query, ok, value, error, ms).
ValidationResult = postgres.QueryCheck


def run_validation_queries(settings: OpsSettings, queries: Sequence[str]) -> list[ValidationResult]:
    """Run each query in a read-only transaction under its own timeout.

    A query passes when it returns a row whose first column is not false, NULL or 0
    (``SELECT count(*) > 0 FROM users``, ``SELECT NOT EXISTS (SELECT ... orphans)``).
    """
    return postgres.run_check_queries(
        settings.postgres,
        queries,
        timeout_seconds=settings.incidents.validation_timeout_seconds,
        application_name="swagger2mcp-ops-validate",
    )


def require_settings(settings: OpsSettings) -> None:
    """Settings errors the incident flows check before any side effect."""
    for query in settings.incidents.validation_queries:
        if not query.strip():
            raise SettingsError("incidents.validation_queries holds an empty query; remove it")
