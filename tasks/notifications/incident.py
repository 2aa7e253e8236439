"""The incident record a page links to: what the runbook's "Escalation" says to attach (the diagnose
report, the failing run's logs and artifacts, recent releases and migrations), written as one
evidence bundle with a sha256 manifest by the security-incident evidence code."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from tasks import incidents, releases
from tasks.notifications.runs import RunSummary
from tasks.secrets import configured_secrets, mask_text, safe_error
from tasks.settings import OpsSettings
from tasks.storage import open_storage

INCIDENT_FILE = "incident.json"


def all_secrets(settings: OpsSettings) -> list[str]:
    """Every secret of the settings, the notification channels' and SMTP's included."""
    return configured_secrets(settings)


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, default=str, sort_keys=True) + "\n").encode()


def latest_diagnose_report(stack: str) -> str | None:
    """The newest ``diagnose-<stack>`` markdown artifact, or None when diagnose never ran."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"diagnose-{stack}"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    if not found or not isinstance(found[0].data, str):
        return None
    return found[0].data


def recent_changes(settings: OpsSettings, errors: dict[str, str]) -> list[dict[str, Any]]:
    """Releases and migrations within ``incidents.release_window_hours``; a source that cannot be read
    is recorded in ``errors`` and the other still taken."""
    window = timedelta(hours=settings.incidents.release_window_hours)
    records: list[Any] = []
    migrations: list[incidents.RecentChange] = []
    try:
        records = releases.ReleaseStore.from_settings(settings).all()
    except Exception as exc:  # a missing or unreadable store must not stop the page
        errors["releases"] = safe_error(exc, settings)
    try:
        migrations = incidents.recent_migration_runs(settings, window=window)
    except Exception as exc:  # the database may be what is down
        errors["migrations"] = safe_error(exc, settings)
    changes = incidents.recent_changes(records, {}, migrations, window=window, now=datetime.now(UTC))
    return [change.as_row() for change in changes]


def collect_incident_bundle(
    settings: OpsSettings, *, title: str, reason: dict[str, Any], run: RunSummary | None
) -> incidents.EvidenceBundle:
    """Collect what a page links to and write it under ``incidents.evidence_prefix`` with its manifest.

    Args:
        title: the page's title (kept in ``incident.json``).
        reason: what caused the page (the event and its facts), kept in ``incident.json``.
        run: the failing flow run, whose summary, logs and artifacts go in ``run/``; None for a page
            that no run caused (health).

    Returns:
        The bundle (location, prefix, manifest and the manifest's sha256).
    """
    secrets = all_secrets(settings)
    files: dict[str, bytes] = {}
    errors: dict[str, str] = {}
    files[INCIDENT_FILE] = _json({"title": title, "stack": settings.stack, "reason": reason})
    if run is not None:
        summary = {
            "id": run.id,
            "name": run.name,
            "flow": run.flow,
            "deployment": run.deployment,
            "state": run.state,
            "message": run.message,
            "parameters": run.parameters,
            "failed_steps": [step.__dict__ for step in run.failed_steps],
            "ui": run.ui_link(settings.notifications.ui_url),
        }
        files["run/flow-run.json"] = _json(summary)
        files["run/logs.txt"] = ("\n".join(run.logs) + "\n").encode()
        for number, artifact in enumerate(run.artifacts, 1):
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", artifact["key"] or f"artifact-{number}").strip("-")
            suffix = "md" if artifact["type"] == "markdown" else "json"
            files[f"run/artifacts/{number:02d}-{name}.{suffix}"] = str(artifact["data"]).encode()
    try:
        diagnose = latest_diagnose_report(settings.stack)
    except Exception as exc:  # the API answered for the run a moment ago; still, record and go on
        errors["diagnose"] = safe_error(exc, settings)
        diagnose = None
    if diagnose is None:
        errors.setdefault("diagnose", f"no diagnose-{settings.stack} report yet: run the diagnose deployment")
    else:
        files["diagnose/report.md"] = diagnose.encode()
    files["changes/recent.json"] = _json(recent_changes(settings, errors))
    masked = {
        path: mask_text(data.decode("utf-8", errors="replace"), secrets).encode()
        for path, data in files.items()
    }
    return incidents.write_evidence_bundle(
        open_storage(settings.storage),
        settings.incidents.evidence_prefix,
        incidents.new_bundle_id(settings.stack),
        settings.stack,
        masked,
        errors,
    )


def bundle_link(bundle: incidents.EvidenceBundle) -> str:
    """Where the bundle is: ``<storage location>/<prefix>/`` (its manifest is ``manifest.json``)."""
    return f"{bundle.location.rstrip('/')}/{bundle.prefix}/"
