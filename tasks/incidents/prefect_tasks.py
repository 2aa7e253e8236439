"""The Prefect tasks of the incident flows, all wrapped here: the plain functions stay callable without
Prefect (tests, other tasks), and a flow submits the wrapped ones. Nothing is cached (as for every ops
task).

The key census and FLUSHDB are tasks of :mod:`tasks.redisdb`; recording replicas, scaling and waiting
for readiness are tasks of :mod:`tasks.scaling`; listing, restarting and the rollout history are the
steps of :mod:`tasks.rollout`.
"""

from __future__ import annotations

from tasks import health, rollout
from tasks.health import HealthReport
from tasks.incidents.evidence import collect_evidence_bundle, verify_bundle
from tasks.incidents.isolation import end_isolation, isolate_systems, plan_isolation
from tasks.incidents.rotation import plan_rotation, restart_for_new_config, rotate_secrets
from tasks.incidents.validation import run_validation_queries
from tasks.ops_task import ops_task
from tasks.settings import OpsSettings

# --- the health read the incident flows share ----------------------------------------------------


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
# The runtime steps are the ones deploy, rollback and restart use (tasks/rollout.py).
service_statuses_task = rollout.list_services
service_histories_task = rollout.histories
restart_services_task = rollout.restart
health_report_task = ops_task(health_report, name="health-checks")
plan_isolation_task = ops_task(plan_isolation, name="plan-isolation")
# No retries: a half-applied isolation is recorded, and end-isolation puts it back.
isolate_systems_task = ops_task(isolate_systems, name="isolate-systems")
end_isolation_task = ops_task(end_isolation, name="restore-after-isolation")
