"""The Kubernetes runtime: apps/v1 Deployments in one namespace, through the official ``kubernetes`` client.

- :mod:`~tasks.kubernetes.runtime`: :class:`KubernetesRuntime` (the Runtime protocol): services, logs,
  resource usage, restart, scale, image changes, readiness, history and undo.

The ``kubernetes`` library is imported only when the API is first called, so choosing another runtime
never loads it.
"""

from __future__ import annotations

from tasks.kubernetes.runtime import (
    EXEC_OUTPUT_LIMIT,
    ISOLATION_LABEL,
    ISOLATION_POLICY,
    MERGE_PATCH,
    POD_TEMPLATE_HASH,
    RESTARTED_AT_ANNOTATION,
    REVISION_ANNOTATION,
    KubernetesRuntime,
    _cpu_cores,
    _quantity_bytes,
    exec_status,
)

__all__ = [
    "EXEC_OUTPUT_LIMIT",
    "ISOLATION_LABEL",
    "ISOLATION_POLICY",
    "MERGE_PATCH",
    "POD_TEMPLATE_HASH",
    "RESTARTED_AT_ANNOTATION",
    "REVISION_ANNOTATION",
    "KubernetesRuntime",
    "_cpu_cores",
    "_quantity_bytes",
    "exec_status",
]
