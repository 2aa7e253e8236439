"""prefect.yaml is the one declaration of deployments: every entrypoint imports, every entry becomes a
served deployment, the catalog of DESIGN is complete, and flows do not import heavy clients they
do not use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prefect import Flow

from deployments.serve import PREFECT_YAML, load_flow, read_specs, to_runner_deployment

ROOT = Path(__file__).resolve().parents[2]
SPECS = read_specs(PREFECT_YAML)


def test_prefect_yaml_declares_deployments() -> None:
    assert SPECS
    names = [(spec.flow_function, spec.name) for spec in SPECS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.entrypoint}/{s.name}")
def test_entrypoint_imports_and_serves(spec) -> None:  # type: ignore[no-untyped-def]
    flow = load_flow(spec)
    assert isinstance(flow, Flow)
    assert flow.__doc__, f"{spec.entrypoint} has no docstring"
    deployment = to_runner_deployment(spec)
    assert deployment.name == spec.name
    # Every declared parameter is one the flow accepts (Prefect would ignore a typo silently).
    assert set(spec.parameters) <= set(flow.parameters.properties)
    # A flow whose own default is a dry run keeps it in its deployment: acting is a per-run choice.
    dry_run_default = flow.parameters.properties.get("dry_run", {}).get("default")
    if dry_run_default is True:
        assert spec.parameters.get("dry_run", True) is True, f"{spec.name}: must stay dry-run by default"


def test_flow_health_imports_no_heavy_clients() -> None:
    code = (
        "import sys, flows.health;"
        "heavy = [m for m in ('kubernetes', 'boto3', 'botocore', 'docker') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# The flow catalog of the design: entrypoints other parts and CI depend on.
CATALOG = {
    "flows/health.py:health_check": "health-check",
    "flows/diagnose.py:diagnose": "diagnose",
    "flows/queues.py:retry_failed_jobs": "retry-failed-jobs",
    "flows/services.py:restart_services": "restart-services",
    "flows/services.py:scale_services": "scale-services",
    "flows/backup.py:backup_database": "backup-database",
    "flows/backup.py:restore_database": "restore-database",
    "flows/migrate.py:migrate_database": "migrate-database",
    "flows/dependencies.py:update_dependencies": "update-dependencies",
    "flows/certificates.py:renew_certificates": "renew-certificates",
    "flows/uploads.py:cleanup_uploads": "cleanup-uploads",
    "flows/releases.py:rollback_release": "rollback-release",
    "flows/releases.py:deploy_release": "deploy-release",
    "flows/incidents.py:outage_triage": "outage-triage",
    "flows/incidents.py:recover_data": "recover-data",
    "flows/incidents.py:security_incident": "security-incident",
    "flows/incidents.py:end_isolation": "end-isolation",
    "flows/maintenance.py:maintenance_window": "maintenance-window",
    "flows/notifications.py:notify_test": "notify-test",
}


def test_every_catalog_flow_is_deployed_under_its_name() -> None:
    declared = {spec.entrypoint: spec for spec in SPECS}
    for entrypoint, flow_name in CATALOG.items():
        assert entrypoint in declared, f"{entrypoint} is not in prefect.yaml"
        assert load_flow(declared[entrypoint]).name == flow_name
    assert any(s.entrypoint == "flows/releases.py:deploy_release" and s.name == "staging" for s in SPECS)
