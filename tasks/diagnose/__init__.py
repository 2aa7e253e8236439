"""Diagnostics: the evidence the runbook's "Common Issues" and "Performance Troubleshooting" gather by
hand, gathered by plain functions, each returning a :class:`Diagnosis` with typed evidence and
findings. A finding has a severity, the runbook section it comes from, the runbook's suggested
resolution and the flow that performs it.

Everything here is read-only. A service that is down is a finding, never an exception: each check
handles the failures it expects, and :func:`run_diagnostic` turns anything else (and a hang past the
deadline) into a finding too.

Where things are:

- ``model``: severities, :class:`Finding`, :class:`Diagnosis`, :class:`DiagnoseReport`, the runbook
  sections and resolution flows findings point at, and how errors are worded (secrets masked);
- one module per system inspected: ``postgres_checks`` (with ``sql_text``, literals masked),
  ``redis_checks``, ``queue_checks``, ``service_checks`` (runtime status, restarts, logs, usage),
  ``system_checks`` (disk, uploads directory, network), ``http_timing_checks`` (response times of the
  app's endpoints, phase by phase), ``upload_limit_checks`` (upload size limits of nginx, Ingresses
  and the backend), ``wal_checks`` (the WAL archive, only where point-in-time recovery is in use);
- ``backend_network_checks``: the same reachability and DNS probed inside the backend's container or
  pod (``Runtime.exec``, tools falling back in order) beside the ops host's view, and their differences;
- ``runner``: every check by name, each run under a deadline (``deadline``);
- ``prefect_tasks``: the Prefect tasks the diagnose flow submits.

Import the names below from this package; the modules are how the code is organised, not an API.
"""

from tasks.diagnose.backend_network_checks import (
    Comparison,
    InsideProbes,
    NetworkViewsEvidence,
    View,
    backend_service,
    network_from_backend,
    network_view_findings,
    network_views,
)
from tasks.diagnose.http_timing_checks import (
    EndpointTiming,
    ResponseTimesEvidence,
    TimingSample,
    response_time_findings,
    response_times,
    time_request,
    timing_endpoints,
)
from tasks.diagnose.model import (
    FLOW_CLEAN_JOBS,
    FLOW_CLEANUP_UPLOADS,
    FLOW_OUTAGE,
    FLOW_RESTART,
    FLOW_RETRY,
    FLOW_SCALE,
    RB_CPU,
    RB_DATABASE,
    RB_DB_LOAD,
    RB_MEMORY,
    RB_NETWORK,
    RB_REDIS,
    RB_SLOW,
    RB_UPLOADS,
    RB_WORKER,
    DiagnoseReport,
    Diagnosis,
    Evidence,
    Finding,
    Severity,
    worst,
)
from tasks.diagnose.postgres_checks import (
    ConnectionGroup,
    ConnectionsEvidence,
    LongQueriesEvidence,
    LongQuery,
    StatementStat,
    TopStatementsEvidence,
    connection_findings,
    long_queries,
    postgres_connections,
    top_statements,
)
from tasks.diagnose.prefect_tasks import run_diagnostic_task, wal_archive_task
from tasks.diagnose.queue_checks import QueuesEvidence, queue_findings, queue_states
from tasks.diagnose.redis_checks import RedisMemory, read_redis_memory, redis_memory, redis_memory_findings
from tasks.diagnose.runner import all_diagnostics, run_diagnostic
from tasks.diagnose.service_checks import LogTail, ServicesEvidence, scan_log, service_findings, services
from tasks.diagnose.sql_text import mask_sql_literals, shown_query
from tasks.diagnose.system_checks import (
    DiskEvidence,
    DiskSpace,
    DnsLookup,
    NetworkEvidence,
    PathEntry,
    TcpProbe,
    UploadsEvidence,
    disk_findings,
    disk_paths,
    disk_space,
    network,
    network_findings,
    network_targets,
    probe_tcp,
    resolve,
    uploads_findings,
    uploads_permissions,
)
from tasks.diagnose.upload_limit_checks import (
    BodyLimit,
    UploadLimitsEvidence,
    ingress_body_limits,
    nginx_body_limits,
    parse_nginx_size,
    read_nginx_config,
    split_nginx_dump,
    upload_limit_findings,
    upload_limits,
)
from tasks.diagnose.wal_checks import WalArchiveEvidence, wal_archive, wal_archive_findings
from tasks.secrets import safe_error

__all__ = [
    "FLOW_CLEANUP_UPLOADS",
    "FLOW_CLEAN_JOBS",
    "FLOW_OUTAGE",
    "FLOW_RESTART",
    "FLOW_RETRY",
    "FLOW_SCALE",
    "RB_CPU",
    "RB_DATABASE",
    "RB_DB_LOAD",
    "RB_MEMORY",
    "RB_NETWORK",
    "RB_REDIS",
    "RB_SLOW",
    "RB_UPLOADS",
    "RB_WORKER",
    "BodyLimit",
    "Comparison",
    "ConnectionGroup",
    "ConnectionsEvidence",
    "DiagnoseReport",
    "Diagnosis",
    "DiskEvidence",
    "DiskSpace",
    "DnsLookup",
    "EndpointTiming",
    "Evidence",
    "Finding",
    "InsideProbes",
    "LogTail",
    "LongQueriesEvidence",
    "LongQuery",
    "NetworkEvidence",
    "NetworkViewsEvidence",
    "PathEntry",
    "QueuesEvidence",
    "RedisMemory",
    "ResponseTimesEvidence",
    "ServicesEvidence",
    "Severity",
    "StatementStat",
    "TcpProbe",
    "TimingSample",
    "TopStatementsEvidence",
    "UploadLimitsEvidence",
    "UploadsEvidence",
    "View",
    "WalArchiveEvidence",
    "all_diagnostics",
    "backend_service",
    "connection_findings",
    "disk_findings",
    "disk_paths",
    "disk_space",
    "ingress_body_limits",
    "long_queries",
    "mask_sql_literals",
    "network",
    "network_findings",
    "network_from_backend",
    "network_targets",
    "network_view_findings",
    "network_views",
    "nginx_body_limits",
    "parse_nginx_size",
    "postgres_connections",
    "probe_tcp",
    "queue_findings",
    "queue_states",
    "read_nginx_config",
    "read_redis_memory",
    "redis_memory",
    "redis_memory_findings",
    "resolve",
    "response_time_findings",
    "response_times",
    "run_diagnostic",
    "run_diagnostic_task",
    "safe_error",
    "scan_log",
    "service_findings",
    "services",
    "shown_query",
    "split_nginx_dump",
    "time_request",
    "timing_endpoints",
    "top_statements",
    "upload_limit_findings",
    "upload_limits",
    "uploads_findings",
    "uploads_permissions",
    "wal_archive",
    "wal_archive_findings",
    "wal_archive_task",
    "worst",
]
