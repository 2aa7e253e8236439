"""The names the Kubernetes API gives what the runtime reads and writes, shared by its modules."""

from __future__ import annotations

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
POD_TEMPLATE_HASH = "pod-template-hash"
# Every patch is a JSON merge patch (RFC 7386): lists are replaced whole, the same on every API server.
MERGE_PATCH = "application/merge-patch+json"
