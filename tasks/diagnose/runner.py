"""Every check by name, and the one way to run one: under a deadline, so that an unexpected error or
a hang becomes a finding of that check instead of failing the diagnosis."""

from __future__ import annotations

import time
from collections.abc import Callable

from tasks.diagnose.backend_network_checks import network_from_backend
from tasks.diagnose.deadline import with_deadline
from tasks.diagnose.http_timing_checks import response_times
from tasks.diagnose.model import Diagnosis, Finding, Severity
from tasks.diagnose.postgres_checks import long_queries, postgres_connections, top_statements
from tasks.diagnose.queue_checks import queue_states
from tasks.diagnose.redis_checks import redis_memory
from tasks.diagnose.service_checks import services
from tasks.diagnose.system_checks import disk_paths, disk_space, network, uploads_permissions
from tasks.diagnose.upload_limit_checks import upload_limits
from tasks.reports import elapsed_ms
from tasks.secrets import configured_secrets, mask_text, one_line, safe_error
from tasks.settings import OpsSettings


def all_diagnostics(
    settings: OpsSettings, long_query_seconds: float | None = None
) -> dict[str, Callable[[], Diagnosis]]:
    """Every check, by name, in the order the report shows them."""
    limits = settings.diagnose
    threshold = long_query_seconds if long_query_seconds is not None else limits.long_query_seconds
    return {
        "postgres-connections": lambda: postgres_connections(settings.postgres, limits),
        "postgres-long-queries": lambda: long_queries(settings.postgres, threshold),
        "postgres-top-statements": lambda: top_statements(settings.postgres, limits),
        "redis-memory": lambda: redis_memory(settings.redis, limits),
        "queues": lambda: queue_states(settings),
        "services": lambda: services(settings),
        "disk": lambda: disk_space(disk_paths(settings), limits),
        "uploads-permissions": lambda: uploads_permissions(settings),
        "network": lambda: network(settings),
        "response-times": lambda: response_times(settings),
        "upload-limits": lambda: upload_limits(settings),
        "network-from-backend": lambda: network_from_backend(settings),
    }


_TITLES = {
    "postgres-connections": "PostgreSQL connections",
    "postgres-long-queries": "Long-running queries",
    "postgres-top-statements": "Top statements",
    "redis-memory": "Redis memory",
    "queues": "BullMQ queues",
    "services": "Services",
    "disk": "Disk space",
    "uploads-permissions": "Uploads directory",
    "network": "Reachability and DNS",
    "response-times": "Response times",
    "upload-limits": "Upload size limits",
    "network-from-backend": "Reachability and DNS: ops host vs inside the backend",
}


def run_diagnostic(name: str, settings: OpsSettings, long_query_seconds: float | None = None) -> Diagnosis:
    """Run the check ``name`` under the deadline; an unexpected error or a hang becomes a finding.

    Raises:
        KeyError: ``name`` is no check of :func:`all_diagnostics`.
    """
    check = all_diagnostics(settings, long_query_seconds)[name]
    started = time.perf_counter()
    title = _TITLES.get(name, name)
    try:
        diagnosis: Diagnosis = with_deadline(check, settings.diagnose.check_deadline_seconds)
    except Exception as exc:
        text = safe_error(exc, settings)
        finding = Finding(
            name,
            Severity.WARNING,
            f"evidence could not be gathered: {text}",
            "Escalation",
            "Gather this evidence by hand (the runbook's commands for this check) and look at the error",
            None,
        )
        return Diagnosis(name, title, None, (finding,), error=text, duration_ms=elapsed_ms(started))
    return Diagnosis(
        diagnosis.check,
        diagnosis.title,
        diagnosis.evidence,
        diagnosis.findings,
        None
        if diagnosis.error is None
        else mask_text(one_line(diagnosis.error), configured_secrets(settings)),
        elapsed_ms(started),
    )
