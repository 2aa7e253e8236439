"""The Prefect tasks of the incident flows, all wrapped here: the plain functions stay callable without
Prefect (tests, other tasks), and a flow submits the wrapped ones. Nothing is cached (as for every ops
task).

The key census and FLUSHDB are tasks of :mod:`tasks.redisdb`; recording replicas, scaling and waiting
for readiness are tasks of :mod:`tasks.scaling`.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks import health
from tasks.health import HealthReport
from tasks.incidents.evidence import collect_evidence_bundle, verify_bundle
from tasks.incidents.rotation import plan_rotation, restart_for_new_config, rotate_secrets
from tasks.incidents.validation import run_validation_queries
from tasks.ops_task import ops_task
from tasks.runtime import ChangeRecord, Revision, Runtime, ServiceStatus
from tasks.settings import OpsSettings

# --- runtime reads the flows share ----------------------------------------------------------------


def service_statuses(runtime: Runtime) -> list[ServiceStatus]:
    """Every service's status (``docker compose ps`` / ``kubectl get deployments``)."""
    return runtime.list_services()


def service_histories(runtime: Runtime, services: Sequence[str]) -> dict[str, list[Revision]]:
    """Each service's rollout history (ReplicaSet revisions, or the recorded releases on Compose)."""
    return {service: runtime.history(service) for service in services}


def restart_services(runtime: Runtime, services: Sequence[str]) -> list[ChangeRecord]:
    """``docker compose restart`` / ``kubectl rollout restart`` the services."""
    return runtime.restart(list(services))


def health_report(settings: OpsSettings) -> HealthReport:
    """The health report (PostgreSQL, Redis, queues, the app's endpoints), as health-check makes it."""
    return health.run_checks(settings)


# --- Prefect task wrappers ------------------------------------------------------------------------

collect_evidence_task = ops_task(collect_evidence_bundle, name="collect-evidence", retries=1)
verify_evidence_task = ops_task(verify_bundle, name="verify-evidence-bundle")
plan_rotation_task = ops_task(plan_rotation, name="plan-secret-rotation")
# No retries: a rotation is all-or-nothing and its failure says what was put back.
rotate_secrets_task = ops_task(rotate_secrets, name="rotate-secrets")
restart_for_new_config_task = ops_task(restart_for_new_config, name="restart-for-new-secrets")
validation_queries_task = ops_task(run_validation_queries, name="run-validation-queries")
service_statuses_task = ops_task(service_statuses, name="list-services", retries=1)
service_histories_task = ops_task(service_histories, name="rollout-history")
restart_services_task = ops_task(restart_services, name="restart-services")
health_report_task = ops_task(health_report, name="health-checks")
