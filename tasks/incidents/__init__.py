"""Incident response: the runbook's "Emergency Procedures".

- :mod:`~tasks.incidents.evidence`: evidence bundles (logs, ``pg_stat_activity``, roles, Redis
  clients, resource usage, release history, health) with a sha256 manifest written last, and their
  verification;
- :mod:`~tasks.incidents.stores`: the application's secret stores (the Compose env file, a Kubernetes
  Secret);
- :mod:`~tasks.incidents.rotation`: the rotation plan and the one confirm-gated rotation (PostgreSQL
  role passwords as SCRAM verifiers, app secrets), and the restart that makes services read them;
- :mod:`~tasks.incidents.isolation`: blocking external traffic (through the runtime) with a record of
  what was there, and ending it by putting that back;
- :mod:`~tasks.incidents.triage`: outage triage, what changed recently and a rollback proposal;
- :mod:`~tasks.incidents.validation`: validation queries after a data recovery;
- :mod:`~tasks.incidents.recovery`: the steps of recover-data (imported by the flow, not re-exported
  here: it builds on the reports and the backup and WAL packages);
- :mod:`~tasks.incidents.outage`: the steps of outage-triage; :mod:`~tasks.incidents.security`: the
  steps of security-incident, and :mod:`~tasks.incidents.isolation_steps`: its isolation steps and
  those of end-isolation (all imported by the flows, not re-exported here, as recovery);
- :mod:`~tasks.incidents.steps`: the step timings the incident reports show, the approval timeout;
- :mod:`~tasks.incidents.prefect_tasks`: every Prefect task of the incident flows.

The Redis key census and ``FLUSHDB`` are in :mod:`tasks.redisdb`; replica counts and scaling to zero
and back are in :mod:`tasks.scaling`. Generated secrets are never logged, returned or stored in a
report: only names and fingerprints (the first 8 hex digits of their sha256).
"""

from __future__ import annotations

from tasks.incidents.evidence import (
    EVIDENCE_MANIFEST,
    EvidenceBundle,
    EvidenceFile,
    EvidenceManifest,
    EvidenceTampered,
    EvidenceVerification,
    collect_evidence,
    collect_evidence_bundle,
    new_bundle_id,
    verify_bundle,
    verify_evidence_bundle,
    write_evidence_bundle,
)
from tasks.incidents.isolation import (
    IsolationEnd,
    IsolationInForce,
    IsolationNotRecorded,
    IsolationRecord,
    end_isolation,
    isolate_systems,
    isolation_path,
    plan_isolation,
    read_isolation,
)
from tasks.incidents.prefect_tasks import (
    collect_evidence_task,
    end_isolation_task,
    health_report,
    health_report_task,
    isolate_systems_task,
    plan_isolation_task,
    plan_rotation_task,
    restart_for_new_config_task,
    restart_services_task,
    rotate_secrets_task,
    service_histories_task,
    service_statuses_task,
    validation_queries_task,
    verify_evidence_task,
)
from tasks.incidents.rotation import (
    FINGERPRINT_CHARS,
    RotatedSecret,
    RotationFailed,
    RotationPlan,
    RotationRecord,
    RotationRefused,
    RotationTarget,
    carry_password,
    fingerprint,
    generate_secret,
    plan_rotation,
    restart_for_new_config,
    rotate_secrets,
)
from tasks.incidents.steps import Step, StepLog
from tasks.incidents.stores import (
    EnvFileStore,
    KubernetesSecretStore,
    SecretStore,
    parse_env,
    secret_stores,
    update_env_text,
    write_file_atomically,
)
from tasks.incidents.triage import (
    RecentChange,
    RollbackProposal,
    propose_rollback,
    recent_changes,
    recent_migration_runs,
)
from tasks.incidents.validation import ValidationResult, require_settings, run_validation_queries

__all__ = [
    "EVIDENCE_MANIFEST",
    "FINGERPRINT_CHARS",
    "EnvFileStore",
    "EvidenceBundle",
    "EvidenceFile",
    "EvidenceManifest",
    "EvidenceTampered",
    "EvidenceVerification",
    "IsolationEnd",
    "IsolationInForce",
    "IsolationNotRecorded",
    "IsolationRecord",
    "KubernetesSecretStore",
    "RecentChange",
    "RollbackProposal",
    "RotatedSecret",
    "RotationFailed",
    "RotationPlan",
    "RotationRecord",
    "RotationRefused",
    "RotationTarget",
    "SecretStore",
    "Step",
    "StepLog",
    "ValidationResult",
    "carry_password",
    "collect_evidence",
    "collect_evidence_bundle",
    "collect_evidence_task",
    "end_isolation",
    "end_isolation_task",
    "fingerprint",
    "generate_secret",
    "health_report",
    "health_report_task",
    "isolate_systems",
    "isolate_systems_task",
    "isolation_path",
    "new_bundle_id",
    "parse_env",
    "plan_isolation",
    "plan_isolation_task",
    "plan_rotation",
    "plan_rotation_task",
    "propose_rollback",
    "read_isolation",
    "recent_changes",
    "recent_migration_runs",
    "require_settings",
    "restart_for_new_config",
    "restart_for_new_config_task",
    "restart_services_task",
    "rotate_secrets",
    "rotate_secrets_task",
    "run_validation_queries",
    "secret_stores",
    "service_histories_task",
    "service_statuses_task",
    "update_env_text",
    "validation_queries_task",
    "verify_bundle",
    "verify_evidence_bundle",
    "verify_evidence_task",
    "write_evidence_bundle",
    "write_file_atomically",
]
