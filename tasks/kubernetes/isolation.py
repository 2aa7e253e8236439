"""Isolation for a security incident: NetworkPolicies that admit ingress to the pods only from the
namespace's own pods, and the policies in their way limited for the time and put back after.

The functions take the :class:`~tasks.kubernetes.runtime.KubernetesRuntime` whose methods
(``plan_isolation``, ``isolate``, ``end_isolation``) they implement. The helpers work on plain data:
the manifests as the API returns them, sanitised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tasks.kubernetes.api import MERGE_PATCH
from tasks.runtime import ChangeRecord, IsolationPlan, RuntimeOperationFailed

if TYPE_CHECKING:
    from tasks.kubernetes.runtime import KubernetesRuntime

ISOLATION_POLICY = "swagger2mcp-ops-isolation"
ISOLATION_LABEL = "swagger2mcp-ops/isolation"
# Ingress from any pod of the policy's own namespace, and nothing else.
_INSIDE_ONLY: list[dict[str, Any]] = [{"from": [{"podSelector": {}}]}]


def network_policies(runtime: KubernetesRuntime) -> dict[str, dict[str, Any]]:
    """Every NetworkPolicy of the namespace as a plain manifest, by name."""
    try:
        items = runtime.networking.list_namespaced_network_policy(
            runtime.namespace, _request_timeout=runtime._timeout
        ).items
    except Exception as exc:
        raise runtime._unavailable(exc) from None
    return {
        p.metadata.name: _policy_manifest(runtime.api_client.sanitize_for_serialization(p)) for p in items
    }


def plan_isolation(runtime: KubernetesRuntime, services: Sequence[str] | None = None) -> IsolationPlan:
    """A NetworkPolicy that admits ingress to the pods only from the namespace's own pods.

    One policy for every pod of the namespace (``services`` None), or one per named Deployment
    selecting its pods. NetworkPolicies add up (a pod takes what any of them allows), so a policy
    already there that lets traffic from outside reach those pods would keep it coming: such a
    policy is recorded whole and its ingress limited to the namespace's pods for the isolation.

    Raises:
        RuntimeOperationFailed: a named Deployment does not exist, or a NetworkPolicy of the name
            this tool uses exists and was not made by it.
    """
    if services:
        deployments = {s: runtime._deployment(s) for s in services}
        selectors = {
            f"{ISOLATION_POLICY}-{s}": runtime.api_client.sanitize_for_serialization(d.spec.selector) or {}
            for s, d in deployments.items()
        }
        pod_labels = [dict(d.spec.template.metadata.labels or {}) for d in deployments.values()]
    else:
        selectors = {ISOLATION_POLICY: {}}
        pod_labels = []
    existing = network_policies(runtime)
    actions: list[str] = []
    undo: list[str] = []
    notes: list[str] = []
    apply: list[dict[str, Any]] = []
    for name, selector in selectors.items():
        wanted = _isolation_policy(name, runtime.namespace, selector)
        found = existing.get(name)
        if found is not None and (found["metadata"].get("labels") or {}).get(ISOLATION_LABEL) != "true":
            raise RuntimeOperationFailed(
                f"NetworkPolicy {name!r} exists in {runtime.namespace!r} and was not made by this tool;"
                " rename or remove it. Nothing was changed."
            )
        if found is None or found["spec"] != wanted["spec"]:
            what = "every pod of the namespace" if not selector else f"pods {_selector_text(selector)}"
            actions.append(
                f"{'create' if found is None else 'update'} NetworkPolicy {name}: ingress to {what} only"
                " from pods of this namespace"
            )
        else:
            notes.append(f"NetworkPolicy {name} is already in place")
        apply.append(wanted)
        undo.append(f"delete NetworkPolicy {name}")
    restricted: dict[str, dict[str, Any]] = {}
    for name, policy in sorted(existing.items()):
        if name in selectors or (policy["metadata"].get("labels") or {}).get(ISOLATION_LABEL) == "true":
            continue
        selected = not pod_labels or any(
            _selects(policy["spec"].get("podSelector") or {}, labels) for labels in pod_labels
        )
        if selected and _admits_outside(policy["spec"]):
            restricted[name] = policy
            actions.append(
                f"limit NetworkPolicy {name} to ingress from pods of this namespace (it lets traffic from"
                " outside reach them)"
            )
            undo.append(f"restore NetworkPolicy {name} as recorded")
    return IsolationPlan(
        runtime=runtime.kind,
        services=tuple(services or ()),
        actions=tuple(actions),
        undo=tuple(undo),
        state={"apply": apply, "restricted": restricted},
        notes=tuple(notes),
    )


def isolate(runtime: KubernetesRuntime, plan: IsolationPlan) -> list[ChangeRecord]:
    """Create (or correct) the isolation policies and limit the recorded ones; each is read back."""
    from kubernetes.client.exceptions import ApiException

    records = []
    existing = network_policies(runtime)
    try:
        for wanted in plan.state.get("apply") or []:
            name = wanted["metadata"]["name"]
            found = existing.get(name)
            if found is not None and found["spec"] == wanted["spec"]:
                records.append(ChangeRecord("isolate", f"NetworkPolicy/{name}", False))
                continue
            if found is None:
                runtime.networking.create_namespaced_network_policy(
                    runtime.namespace, wanted, _request_timeout=runtime._timeout
                )
            else:
                _patch_policy(runtime, name, {"spec": _merge_to(found["spec"], wanted["spec"])})
            records.append(
                ChangeRecord(
                    "isolate",
                    f"NetworkPolicy/{name}",
                    True,
                    before={"exists": str(found is not None)},
                    after={"spec": _compact(wanted["spec"])},
                    commands=(f"kubectl apply -n {runtime.namespace} -f - (NetworkPolicy {name})",),
                )
            )
        for name, recorded in (plan.state.get("restricted") or {}).items():
            limited = {"ingress": _INSIDE_ONLY}
            _patch_policy(runtime, name, {"spec": limited})
            records.append(
                ChangeRecord(
                    "isolate",
                    f"NetworkPolicy/{name}",
                    True,
                    before={"ingress": _compact(recorded["spec"].get("ingress"))},
                    after={"ingress": _compact(_INSIDE_ONLY)},
                    commands=(
                        f"kubectl patch networkpolicy {name} -n {runtime.namespace} --type merge"
                        f" -p '{_compact(limited)}'",
                    ),
                )
            )
    except ApiException as exc:
        raise RuntimeOperationFailed(
            f"Kubernetes refused a NetworkPolicy change (HTTP {exc.status}: {exc.reason}); the isolation"
            " is partly applied: run end-isolation to put back what was recorded"
        ) from None
    now = network_policies(runtime)
    wrong = [
        w["metadata"]["name"]
        for w in plan.state.get("apply") or []
        if (now.get(w["metadata"]["name"]) or {}).get("spec") != w["spec"]
    ]
    wrong += [n for n in plan.state.get("restricted") or {} if n in now and _admits_outside(now[n]["spec"])]
    if wrong:
        raise RuntimeOperationFailed(
            f"NetworkPolicies not as applied when read back: {', '.join(wrong)}; external traffic may"
            " still reach the pods. Run end-isolation, then isolate again"
        )
    return records


def end_isolation(runtime: KubernetesRuntime, plan: IsolationPlan) -> list[ChangeRecord]:
    """Delete the isolation policies and put each limited policy back as recorded (created again
    when it was deleted meanwhile); read back and compared with the record."""
    from kubernetes.client.exceptions import ApiException

    records = []
    existing = network_policies(runtime)
    try:
        for wanted in plan.state.get("apply") or []:
            name = wanted["metadata"]["name"]
            if name in existing:
                runtime.networking.delete_namespaced_network_policy(
                    name, runtime.namespace, _request_timeout=runtime._timeout
                )
            records.append(
                ChangeRecord(
                    "end-isolation",
                    f"NetworkPolicy/{name}",
                    name in existing,
                    before={"exists": str(name in existing)},
                    after={"exists": "False"},
                    commands=(f"kubectl delete networkpolicy {name} -n {runtime.namespace}",),
                )
            )
        for name, recorded in (plan.state.get("restricted") or {}).items():
            found = existing.get(name)
            if found is None:
                runtime.networking.create_namespaced_network_policy(
                    runtime.namespace, recorded, _request_timeout=runtime._timeout
                )
                command = f"kubectl apply -n {runtime.namespace} -f - (NetworkPolicy {name}, as recorded)"
            else:
                _patch_policy(runtime, name, _restore_patch(found, recorded))
                command = (
                    f"kubectl patch networkpolicy {name} -n {runtime.namespace} --type merge (as recorded)"
                )
            records.append(
                ChangeRecord(
                    "end-isolation",
                    f"NetworkPolicy/{name}",
                    found is None or found["spec"] != recorded["spec"],
                    before={"ingress": _compact((found or {}).get("spec", {}).get("ingress"))},
                    after={"ingress": _compact(recorded["spec"].get("ingress"))},
                    commands=(command,),
                )
            )
    except ApiException as exc:
        raise RuntimeOperationFailed(
            f"Kubernetes refused a NetworkPolicy change (HTTP {exc.status}: {exc.reason}); the isolation"
            " is partly ended: run end-isolation again"
        ) from None
    now = network_policies(runtime)
    left = [w["metadata"]["name"] for w in plan.state.get("apply") or [] if w["metadata"]["name"] in now]
    differ = [
        n
        for n, recorded in (plan.state.get("restricted") or {}).items()
        if n not in now or now[n]["spec"] != recorded["spec"]
    ]
    if left or differ:
        raise RuntimeOperationFailed(
            "NetworkPolicies not as recorded when read back:"
            + (f" still there: {', '.join(left)};" if left else "")
            + (f" differing from the record: {', '.join(differ)};" if differ else "")
            + " run end-isolation again"
        )
    return records


def _patch_policy(runtime: KubernetesRuntime, name: str, body: dict[str, Any]) -> None:
    runtime.networking.patch_namespaced_network_policy(
        name, runtime.namespace, body, _content_type=MERGE_PATCH, _request_timeout=runtime._timeout
    )


# -- NetworkPolicy helpers (plain data: the manifests as the API returns them, sanitised) ------------


def _policy_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """The parts of a NetworkPolicy that make it what it is (no uid, resourceVersion, status...)."""
    metadata = raw.get("metadata") or {}
    kept = {k: metadata[k] for k in ("name", "namespace", "labels", "annotations") if metadata.get(k)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": kept,
        "spec": raw.get("spec") or {},
    }


def _isolation_policy(name: str, namespace: str, selector: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "swagger2mcp-ops", ISOLATION_LABEL: "true"},
            "annotations": {
                "swagger2mcp-ops/purpose": "security-incident isolation: ingress only from this namespace's"
                " pods; end-isolation removes it"
            },
        },
        "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": _INSIDE_ONLY},
    }


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects ``labels``; {} selects all."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = (
            expression.get("key"),
            expression.get("operator"),
            expression.get("values") or [],
        )
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _admits_outside(spec: dict[str, Any]) -> bool:
    """Whether a policy lets ingress come from beyond the namespace's own pods: a rule with no
    ``from`` (everyone), an ``ipBlock`` or a ``namespaceSelector`` peer."""
    types = spec.get("policyTypes") or ["Ingress"]
    if "Ingress" not in types:
        return False
    for rule in spec.get("ingress") or []:
        peers = rule.get("from") or []
        if not peers or any("ipBlock" in p or "namespaceSelector" in p for p in peers):
            return True
    return False


def _merge_to(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning ``current`` into ``wanted`` at the top level (absent keys set to null)."""
    return {**{k: None for k in current if k not in wanted}, **wanted}


def _restore_patch(current: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that puts a policy's labels, annotations and spec back as recorded."""
    meta_now = current.get("metadata") or {}
    meta_then = recorded.get("metadata") or {}
    metadata = {
        key: _merge_to(meta_now.get(key) or {}, meta_then.get(key) or {}) or None
        for key in ("labels", "annotations")
        if (meta_now.get(key) or {}) != (meta_then.get(key) or {})
    }
    patch: dict[str, Any] = {"spec": _merge_to(current.get("spec") or {}, recorded.get("spec") or {})}
    if metadata:
        patch["metadata"] = metadata
    return patch


def _selector_text(selector: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())) or _compact(
        selector
    )


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
