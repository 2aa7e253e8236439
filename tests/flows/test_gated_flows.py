"""Every gated flow refuses ``approved=true`` in production before it touches anything.

The settings point PostgreSQL and Redis at closed ports and the storage at an empty directory: a
flow that probed, locked, backed up, collected evidence or read a backup before refusing would end
with a connection or "no backup" error instead of the refusal, or leave files behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.backup import restore_database
from flows.incidents import end_isolation, flush_redis, outage_triage, recover_data, security_incident
from flows.maintenance import maintenance_window
from flows.migrate import migrate_database
from flows.pitr import restore_to_point

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]

REFUSAL = "not applied: approved=true is not allowed"

# flow, its parameters for a real run, and the artifact key prefix of a report that records the refusal
# (None: the flow refuses before its report exists, and the run's state message says it).
GATED: dict[str, tuple[Callable[..., Any], dict[str, Any], str | None]] = {
    "restore-database": (restore_database, {"dry_run": False}, "restore"),
    "restore-to-point": (
        restore_to_point,
        {"dry_run": False, "target_lsn": "0/3000148"},
        "restore-to-point",
    ),
    "migrate-database": (migrate_database, {"dry_run": False}, "migration"),
    "maintenance-window": (maintenance_window, {"dry_run": False}, None),
    "outage-triage": (outage_triage, {}, None),
    "recover-data": (recover_data, {"dry_run": False, "backup_id": "latest"}, None),
    "security-incident": (security_incident, {"dry_run": False}, None),
    "end-isolation": (end_isolation, {"dry_run": False}, None),
    "flush-redis": (flush_redis, {"dry_run": False}, None),
}


def _artifact_text(key: str) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return "\n".join(json.dumps(a.data) for a in found)


@pytest.mark.parametrize("name", sorted(GATED))
def test_preapproval_is_refused_in_production_before_any_side_effect(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    flow_fn, params, report_key = GATED[name]
    stack = f"refused-{name}"
    storage = tmp_path / "storage"
    monkeypatch.chdir(tmp_path)
    # A configured (never run) migration directory: a missing one would be refused first, as a setting.
    (tmp_path / "alembic").mkdir()
    (tmp_path / "alembic" / "env.py").write_text("")
    for key, value in {
        "OPS_STACK": stack,
        "OPS_RUNTIME__ENVIRONMENT": "production",
        "OPS_RUNTIME__KIND": "none",
        # Closed ports: any connection before the refusal would be the run's error instead.
        "OPS_POSTGRES__DSN": "postgresql://postgres@127.0.0.1:9/app",
        "OPS_REDIS__URL": "redis://127.0.0.1:9/0",
        "OPS_STORAGE__URL": f"file://{storage}",
        "OPS_UPLOADS__ROOT": str(tmp_path / "uploads"),
        "OPS_MIGRATIONS__SCRIPT_LOCATION": str(tmp_path / "alembic"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OPS_APPROVALS__ALLOW_PREAPPROVED", raising=False)

    state = flow_fn(approved=True, return_state=True, **params)

    assert state.is_failed()
    assert REFUSAL in (state.message or ""), state.message
    assert not storage.exists() or not any(storage.rglob("*")), "something was written to the storage"
    if report_key is not None:
        assert REFUSAL in _artifact_text(f"{report_key}-{stack}")
