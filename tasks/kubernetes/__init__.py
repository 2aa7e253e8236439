"""The Kubernetes runtime: apps/v1 Deployments in one namespace, through the official ``kubernetes`` client.

- :mod:`~tasks.kubernetes.runtime`: :class:`KubernetesRuntime` (the Runtime protocol): services, logs,
  resource usage, restart, scale, image changes, readiness, history and undo;
- :mod:`~tasks.kubernetes.exec`: commands inside a service (pods/exec over a websocket);
- :mod:`~tasks.kubernetes.isolation`: isolation for a security incident (NetworkPolicies) and its end;
- :mod:`~tasks.kubernetes.api`: the annotations, labels and patch type of the API the modules share.

The ``kubernetes`` library is imported only when the API is first called, so choosing another runtime
never loads it.
"""

from __future__ import annotations

from tasks.kubernetes.api import MERGE_PATCH, POD_TEMPLATE_HASH, RESTARTED_AT_ANNOTATION, REVISION_ANNOTATION
from tasks.kubernetes.exec import EXEC_OUTPUT_LIMIT, exec_status
from tasks.kubernetes.isolation import ISOLATION_LABEL, ISOLATION_POLICY
from tasks.kubernetes.runtime import KubernetesRuntime, _cpu_cores, _quantity_bytes

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
