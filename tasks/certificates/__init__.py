"""TLS certificates: read them from disk and from the wire, decide renewal, run certbot, reload the
server, and prove what is served.

Plain typed functions; the ``renew-certificates`` flow calls their Prefect task wrappers. The
evidence that a renewal worked is the certificate the server actually serves, read by a TLS handshake
validated like a browser would (chain against a CA bundle, hostname by SNI), never certbot's exit
code alone: a renewed file that nginx was not told to reload keeps the old certificate in memory
until it expires.

Where things are:

- ``files``: certificates on disk (certbot lineages, PEM files) and :class:`CertificateInfo`;
- ``served``: the certificate an endpoint serves (TLS handshake) and the one it should serve;
- ``decisions``: small pure functions: what is due, the findings, the renewal plan;
- ``inventory``: everything watched and served at one moment, with the findings;
- ``certbot``: ``certbot renew`` (dry run and real) and its change record;
- ``reload``: nginx, Compose or Kubernetes told to load the renewed certificates;
- ``proof``: every endpoint judged against the certificates on disk after the run;
- ``summary``: the record of one run and what makes it fail;
- ``prefect_tasks``: the Prefect tasks the renew-certificates flow calls.

Import the names below from this package; the modules are how the code is organised, not an API.
"""

from tasks.certificates.certbot import (
    DryRunResult,
    RenewalFailed,
    RenewalRecord,
    certbot_dry_run,
    certbot_env,
    certbot_log_cause,
    certbot_program,
    certbot_reason,
    certbot_renew_argv,
    challenge_problems,
    lineage_server,
    renew_lineage,
)
from tasks.certificates.decisions import (
    EndpointState,
    Finding,
    FindingKind,
    Inventory,
    RenewalPlan,
    certificate_findings,
    endpoint_findings,
    plan_renewals,
    renewal_minimum_days,
    renewal_threshold,
    should_renew,
)
from tasks.certificates.files import (
    CertificateFileError,
    CertificateInfo,
    WatchedCertificate,
    certificate_info,
    lineage_names,
    read_certificate,
    read_lineage,
    read_watched,
    renewal_server,
)
from tasks.certificates.inventory import take_inventory
from tasks.certificates.prefect_tasks import (
    certbot_dry_run_task,
    reload_server_task,
    renew_lineage_task,
    take_inventory_task,
    verify_endpoints_task,
)
from tasks.certificates.proof import EndpointVerdict, judge_endpoint, verify_endpoints
from tasks.certificates.reload import ReloadFailed, ReloadRecord, reload_commands, reload_env, reload_server
from tasks.certificates.served import (
    EndpointUnreachable,
    ServedCertificate,
    ServedCertificateInvalid,
    expected_certificate,
    fetch_served_certificate,
    probe_endpoint,
)
from tasks.certificates.summary import RunSummary

__all__ = [
    "CertificateFileError",
    "CertificateInfo",
    "DryRunResult",
    "EndpointState",
    "EndpointUnreachable",
    "EndpointVerdict",
    "Finding",
    "FindingKind",
    "Inventory",
    "ReloadFailed",
    "ReloadRecord",
    "RenewalFailed",
    "RenewalPlan",
    "RenewalRecord",
    "RunSummary",
    "ServedCertificate",
    "ServedCertificateInvalid",
    "WatchedCertificate",
    "certbot_dry_run",
    "certbot_dry_run_task",
    "certbot_env",
    "certbot_log_cause",
    "certbot_program",
    "certbot_reason",
    "certbot_renew_argv",
    "certificate_findings",
    "certificate_info",
    "challenge_problems",
    "endpoint_findings",
    "expected_certificate",
    "fetch_served_certificate",
    "judge_endpoint",
    "lineage_names",
    "lineage_server",
    "plan_renewals",
    "probe_endpoint",
    "read_certificate",
    "read_lineage",
    "read_watched",
    "reload_commands",
    "reload_env",
    "reload_server",
    "reload_server_task",
    "renew_lineage",
    "renew_lineage_task",
    "renewal_minimum_days",
    "renewal_server",
    "renewal_threshold",
    "should_renew",
    "take_inventory",
    "take_inventory_task",
    "verify_endpoints",
    "verify_endpoints_task",
]
