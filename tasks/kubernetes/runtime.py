"""The Kubernetes runtime: apps/v1 Deployments in one namespace, through the official ``kubernetes`` client.

- restart: the ``kubectl.kubernetes.io/restartedAt`` pod-template annotation (``kubectl rollout restart``);
- scale: the Deployment's ``scale`` subresource;
- image change: a JSON merge patch of the pod template's containers;
- history and undo: the Deployment's ReplicaSets and their ``deployment.kubernetes.io/revision``
  (``kubectl rollout history / undo``): undo copies the chosen ReplicaSet's pod template back;
- readiness: the Deployment's status, the way ``kubectl rollout status`` reads it;
- logs from the pods; resource usage from the metrics API (``metrics.k8s.io``) when it is installed;
- exec and isolation: the methods of the protocol, their bodies in :mod:`tasks.kubernetes.exec` and
  :mod:`tasks.kubernetes.isolation`.

Every patch is ``application/merge-patch+json`` (RFC 7386): lists are replaced whole, so the patch
always carries the complete container list, and the result is the same on every API server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tasks.kubernetes import isolation
from tasks.kubernetes.api import MERGE_PATCH, POD_TEMPLATE_HASH, RESTARTED_AT_ANNOTATION, REVISION_ANNOTATION
from tasks.kubernetes.exec import exec_in_pod
from tasks.runtime import (
    ChangeRecord,
    ExecResult,
    IsolationPlan,
    ResourceUsage,
    Revision,
    RuntimeOperationFailed,
    RuntimeUnavailable,
    ServicesNotReady,
    ServiceStatus,
    not_ready_summary,
)
from tasks.settings import OpsSettings

_FAILED_REASONS = {"ProgressDeadlineExceeded"}
_PULL_FAILURES = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CrashLoopBackOff"}


def _quantity_bytes(value: str) -> int:
    """A Kubernetes memory quantity (``123Ki``, ``5Mi``, ``1G``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(float(value))


def _cpu_cores(value: str) -> float:
    """A Kubernetes CPU quantity (``250m``, ``12345n``, ``1``) in cores."""
    for suffix, factor in (("n", 1e-9), ("u", 1e-6), ("m", 1e-3)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def _labels_match(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


class KubernetesRuntime:
    """``runtime.kind = "kubernetes"``: each service is a Deployment of the same name in the namespace."""

    kind = "kubernetes"

    def __init__(self, settings: OpsSettings) -> None:
        self.settings = settings
        self.config = settings.runtime.kubernetes
        self.namespace = self.config.namespace
        self._api_client: Any = None

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def api_client(self) -> Any:
        """An ``ApiClient`` of its own (not the library's global default), configured once."""
        if self._api_client is None:
            from kubernetes import client, config

            configuration = client.Configuration()
            try:
                if self.config.kubeconfig is not None or self.config.context is not None:
                    config.load_kube_config(
                        config_file=str(self.config.kubeconfig) if self.config.kubeconfig else None,
                        context=self.config.context,
                        client_configuration=configuration,
                    )
                elif self.config.api_url is None:
                    try:
                        config.load_incluster_config(client_configuration=configuration)
                    except config.ConfigException:
                        config.load_kube_config(client_configuration=configuration)
            except (config.ConfigException, OSError) as exc:
                raise RuntimeUnavailable(
                    f"no Kubernetes configuration: {exc}. Set OPS_RUNTIME__KUBERNETES__KUBECONFIG /"
                    " __CONTEXT, or __API_URL (+ __TOKEN), or run in a cluster"
                ) from None
            if self.config.api_url is not None:
                configuration.host = self.config.api_url.rstrip("/")
            if self.config.token is not None:
                configuration.api_key = {"BearerToken": self.config.token.get_secret_value()}
                configuration.api_key_prefix = {"BearerToken": "Bearer"}
            configuration.verify_ssl = self.config.verify_ssl
            self._api_client = client.ApiClient(configuration)
        return self._api_client

    @property
    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api_client)

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @property
    def networking(self) -> Any:
        from kubernetes import client

        return client.NetworkingV1Api(self.api_client)

    @property
    def _timeout(self) -> float:
        return self.config.request_timeout_seconds

    def _deployment(self, service: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.apps.read_namespaced_deployment(
                service, self.namespace, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                raise RuntimeOperationFailed(
                    f"no Deployment {service!r} in namespace {self.namespace!r}; check runtime.services and"
                    " runtime.kubernetes.namespace. Nothing was changed."
                ) from None
            raise self._unavailable(exc) from None
        except Exception as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> RuntimeUnavailable:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        status = getattr(exc, "status", None)
        return RuntimeUnavailable(
            f"Kubernetes API at {self.api_client.configuration.host} failed"
            f"{f' (HTTP {status})' if status else ''}: {reason}; check the cluster and the credentials"
        )

    def _patch(self, service: str, body: dict[str, Any]) -> Any:
        return self.apps.patch_namespaced_deployment(
            service, self.namespace, body, _content_type=MERGE_PATCH, _request_timeout=self._timeout
        )

    @staticmethod
    def _images(template: Any) -> dict[str, str]:
        return {c.name: c.image for c in (template.spec.containers or [])}

    @staticmethod
    def _main_container(service: str, template: Any) -> Any:
        containers = template.spec.containers or []
        named = [c for c in containers if c.name == service]
        return (named or containers)[0]

    # -- reads ----------------------------------------------------------------------------------

    def _status(self, deployment: Any) -> ServiceStatus:
        spec_replicas = deployment.spec.replicas if deployment.spec.replicas is not None else 1
        status = deployment.status
        generation = deployment.metadata.generation
        observed = status.observed_generation if status else None
        current = generation is None or (observed is not None and observed >= generation)
        updated = (status.updated_replicas or 0) if status else 0
        ready_total = (status.ready_replicas or 0) if status else 0
        total = (status.replicas or 0) if status else 0
        ready = min(ready_total, updated) if current and total <= max(updated, spec_replicas) else 0
        failed = [
            c.reason
            for c in ((status.conditions or []) if status else [])
            if c.type == "Progressing" and c.status == "False" and c.reason in _FAILED_REASONS
        ]
        if failed:
            state = failed[0]
        elif spec_replicas == 0:
            state = "scaled to 0"
        elif current and ready >= spec_replicas:
            state = "available"
        else:
            state = "progressing"
        annotations = deployment.spec.template.metadata.annotations or {}
        restarted = annotations.get(RESTARTED_AT_ANNOTATION)
        started_at = None
        if restarted:
            with contextlib.suppress(ValueError):
                started_at = datetime.fromisoformat(restarted.replace("Z", "+00:00"))
        return ServiceStatus(
            name=deployment.metadata.name,
            image=self._main_container(deployment.metadata.name, deployment.spec.template).image,
            desired=spec_replicas,
            ready=ready,
            state=state,
            started_at=started_at or deployment.metadata.creation_timestamp,
            revision=(deployment.metadata.annotations or {}).get(REVISION_ANNOTATION),
        )

    def list_services(self) -> list[ServiceStatus]:
        """The configured services' Deployments (a missing one shows as ``missing``)."""
        statuses = []
        for service in self.settings.runtime.services:
            try:
                statuses.append(self._status(self._deployment(service)))
            except RuntimeOperationFailed:
                statuses.append(ServiceStatus(name=service, image=None, desired=1, ready=0, state="missing"))
        return statuses

    def _pods(self, deployment: Any) -> list[Any]:
        selector = dict(deployment.spec.selector.match_labels or {})
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=label_selector, _request_timeout=self._timeout
        ).items
        # The selector is applied again here: some API servers (emulators) ignore it.
        return [p for p in pods if _labels_match(selector, p.metadata.labels)]

    def logs(self, service: str, tail: int = 100) -> str:
        """The last ``tail`` lines of each of the Deployment's pods."""
        pods = self._pods(self._deployment(service))
        parts = []
        for pod in pods:
            text = self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace, tail_lines=tail, _request_timeout=self._timeout
            )
            parts.append(text if len(pods) == 1 else f"== {pod.metadata.name} ==\n{text}")
        return "\n".join(parts)

    def resource_usage(self) -> list[ResourceUsage]:
        """CPU and memory per service from the metrics API; ``available=False`` where it is not installed."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            metrics: Any = client.CustomObjectsApi(self.api_client).list_namespaced_custom_object(
                "metrics.k8s.io", "v1beta1", self.namespace, "pods", _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status in (404, 503):
                return [
                    ResourceUsage(s, None, None, available=False, note="metrics API (metrics-server) absent")
                    for s in self.settings.runtime.services
                ]
            raise self._unavailable(exc) from None
        usage = []
        for service in self.settings.runtime.services:
            deployment = self._deployment(service)
            selector = dict(deployment.spec.selector.match_labels or {})
            cpu = 0.0
            memory = 0
            found = False
            for item in metrics.get("items", []):
                if not _labels_match(selector, item.get("metadata", {}).get("labels")):
                    continue
                found = True
                for container in item.get("containers", []):
                    cpu += _cpu_cores(container.get("usage", {}).get("cpu", "0"))
                    memory += _quantity_bytes(container.get("usage", {}).get("memory", "0"))
            usage.append(
                ResourceUsage(service, round(cpu * 100, 2), memory)
                if found
                else ResourceUsage(service, None, None, available=False, note="no pod metrics yet")
            )
        return usage

    # -- changes --------------------------------------------------------------------------------

    def restart(self, services: Sequence[str]) -> list[ChangeRecord]:
        """``kubectl rollout restart``: a new ``restartedAt`` template annotation on each Deployment."""
        if not services:
            raise RuntimeOperationFailed("no services named; name at least one")
        deployments = {s: self._deployment(s) for s in services}  # all exist before any change
        records = []
        for service, deployment in deployments.items():
            before = (deployment.spec.template.metadata.annotations or {}).get(RESTARTED_AT_ANNOTATION)
            now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            self._patch(
                service, {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: now}}}}}
            )
            records.append(
                ChangeRecord(
                    operation="restart",
                    target=service,
                    changed=True,
                    before={RESTARTED_AT_ANNOTATION: str(before)},
                    after={RESTARTED_AT_ANNOTATION: now},
                    commands=(f"kubectl rollout restart deployment/{service} -n {self.namespace}",),
                )
            )
        return records

    def scale(self, service: str, replicas: int) -> ChangeRecord:
        """Set the Deployment's replicas through its ``scale`` subresource."""
        if replicas < 0:
            raise RuntimeOperationFailed(f"replicas must be 0 or more, not {replicas}")
        before = self._deployment(service).spec.replicas
        command = f"kubectl scale deployment/{service} --replicas={replicas} -n {self.namespace}"
        if before == replicas:
            return ChangeRecord("scale", service, False, {"replicas": str(before)}, {"replicas": str(before)})
        # The response is not read: the Scale object is all this needs, and it was just sent.
        self.apps.patch_namespaced_deployment_scale(
            service,
            self.namespace,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
            _request_timeout=self._timeout,
            _preload_content=False,
        ).release_conn()
        after = self._deployment(service).spec.replicas
        return ChangeRecord(
            operation="scale",
            target=service,
            changed=before != after,
            before={"replicas": str(before)},
            after={"replicas": str(after)},
            commands=(command,),
        )

    def set_images(self, images: dict[str, str], operation: str = "set-image") -> list[ChangeRecord]:
        """Set each Deployment's main container image (the container named like the service, else the
        first one); unchanged services are not patched."""
        deployments = {s: self._deployment(s) for s in images}  # all exist before any change
        records = []
        for service, image in images.items():
            deployment = deployments[service]
            main = self._main_container(service, deployment.spec.template)
            before = main.image
            command = f"kubectl set image deployment/{service} {main.name}={image} -n {self.namespace}"
            if before == image:
                records.append(ChangeRecord(operation, service, False, {"image": before}, {"image": image}))
                continue
            containers = self.api_client.sanitize_for_serialization(deployment.spec.template.spec.containers)
            for container in containers:
                if container["name"] == main.name:
                    container["image"] = image
            self._patch(service, {"spec": {"template": {"spec": {"containers": containers}}}})
            records.append(
                ChangeRecord(operation, service, True, {"image": before}, {"image": image}, (command,))
            )
        return records

    def _rollout_problem(self, deployment: Any) -> str | None:
        """A reason the rollout cannot finish by waiting (image pull failure, deadline exceeded)."""
        status = self._status(deployment)
        if status.state in _FAILED_REASONS:
            return status.state
        with contextlib.suppress(Exception):
            for pod in self._pods(deployment):
                for container in (pod.status.container_statuses or []) if pod.status else []:
                    waiting = container.state.waiting if container.state else None
                    main_image = self._main_container(status.name, deployment.spec.template).image
                    if waiting is None:
                        continue
                    if waiting.reason in _PULL_FAILURES and container.image == main_image:
                        return f"{pod.metadata.name}: {waiting.reason} {waiting.message or ''}".strip()
        return None

    def wait_ready(self, services: Sequence[str], timeout: float) -> list[ServiceStatus]:
        """Wait like ``kubectl rollout status``: the new template observed, updated and ready everywhere.

        Raises:
            ServicesNotReady: the timeout passed, or the rollout cannot finish (image pull failure,
                progress deadline exceeded); the message shows each service's state.
        """
        deadline = time.monotonic() + timeout
        interval = min(self.settings.runtime.poll_interval_seconds, max(timeout / 10, 0.2))
        while True:
            deployments = [self._deployment(s) for s in services]
            statuses = [self._status(d) for d in deployments]
            if all(s.healthy for s in statuses):
                return statuses
            problems = [
                p
                for d, s in zip(deployments, statuses, strict=True)
                if not s.healthy
                for p in [self._rollout_problem(d)]
                if p
            ]
            if problems or time.monotonic() >= deadline:
                why = (
                    f"rollout failed ({'; '.join(problems)})"
                    if problems
                    else f"not ready within {timeout:g}s"
                )
                raise ServicesNotReady(f"{why}: {not_ready_summary(statuses)}", statuses)
            time.sleep(interval)

    # -- history and undo -----------------------------------------------------------------------

    def _replica_sets(self, deployment: Any) -> list[Any]:
        uid = deployment.metadata.uid
        name = deployment.metadata.name
        items = self.apps.list_namespaced_replica_set(
            self.namespace,
            label_selector=",".join(
                f"{k}={v}" for k, v in sorted((deployment.spec.selector.match_labels or {}).items())
            ),
            _request_timeout=self._timeout,
        ).items
        owned = []
        for rs in items:
            owners = rs.metadata.owner_references or []
            mine = any(
                o.kind == "Deployment" and (o.uid == uid or (uid is None and o.name == name)) for o in owners
            )
            if mine and (rs.metadata.annotations or {}).get(REVISION_ANNOTATION):
                owned.append(rs)
        return sorted(owned, key=lambda rs: int(rs.metadata.annotations[REVISION_ANNOTATION]))

    def history(self, service: str) -> list[Revision]:
        """``kubectl rollout history``: the Deployment's ReplicaSets by revision, oldest first."""
        deployment = self._deployment(service)
        current = (deployment.metadata.annotations or {}).get(REVISION_ANNOTATION)
        return [
            Revision(
                service=service,
                revision=rs.metadata.annotations[REVISION_ANNOTATION],
                images=self._images(rs.spec.template),
                created_at=rs.metadata.creation_timestamp,
                current=rs.metadata.annotations[REVISION_ANNOTATION] == current,
                note=(rs.metadata.annotations or {}).get("kubernetes.io/change-cause"),
            )
            for rs in self._replica_sets(deployment)
        ]

    def rollback(self, service: str, revision: str | None = None) -> ChangeRecord:
        """``kubectl rollout undo [--to-revision]``: copy that ReplicaSet's pod template back.

        Raises:
            RuntimeOperationFailed: no such revision, or no earlier revision is kept.
        """
        deployment = self._deployment(service)
        current = (deployment.metadata.annotations or {}).get(REVISION_ANNOTATION)
        replica_sets = self._replica_sets(deployment)
        if revision is None:
            earlier = [rs for rs in replica_sets if rs.metadata.annotations[REVISION_ANNOTATION] != current]
            chosen = earlier[-1:]
        else:
            chosen = [
                rs for rs in replica_sets if rs.metadata.annotations[REVISION_ANNOTATION] == str(revision)
            ]
        if not chosen:
            kept = ", ".join(rs.metadata.annotations[REVISION_ANNOTATION] for rs in replica_sets) or "none"
            what = f"revision {revision} is" if revision else "no earlier revision is"
            raise RuntimeOperationFailed(
                f"cannot roll back {service}: {what}"
                f" not kept (revisions kept: {kept}; see revisionHistoryLimit). Nothing was changed."
            )
        target = chosen[0]
        target_revision = target.metadata.annotations[REVISION_ANNOTATION]
        template = self.api_client.sanitize_for_serialization(target.spec.template)
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels.pop(POD_TEMPLATE_HASH, None)
        now_meta = deployment.spec.template.metadata
        # Merge patch: keys the old template lacks must be removed explicitly (null).
        label_patch: dict[str, Any] = {k: None for k in (now_meta.labels or {}) if k not in labels}
        label_patch.update(labels)
        old_annotations = dict(template.get("metadata", {}).get("annotations") or {})
        annotation_patch: dict[str, Any] = {
            k: None for k in (now_meta.annotations or {}) if k not in old_annotations
        }
        annotation_patch.update(old_annotations)
        template["metadata"] = {"labels": label_patch, "annotations": annotation_patch or None}
        before = self._main_container(service, deployment.spec.template).image
        self._patch(service, {"spec": {"template": template}})
        after = self._main_container(service, target.spec.template).image
        return ChangeRecord(
            operation="rollback",
            target=service,
            changed=True,
            before={"image": before, "revision": str(current)},
            after={"image": after, "revision": f"{target_revision} (re-applied as a new revision)"},
            commands=(
                f"kubectl rollout undo deployment/{service} --to-revision={target_revision}"
                f" -n {self.namespace}",
            ),
        )

    def single_replica_reason(self, service: str) -> str | None:
        """None for an existing Deployment: its replicas are pods, each with its own name and IP (a
        ``hostPort`` limits them to one per node, which the scheduler handles by leaving extras Pending).

        Raises:
            RuntimeOperationFailed: no such Deployment.
        """
        self._deployment(service)
        return None

    # -- commands inside a service --------------------------------------------------------------

    def exec(self, service: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """``kubectl exec`` (pods/exec over a websocket) without stdin or TTY in the service's first
        running pod (by name), in its container named like the service (else its first container).

        Past ``timeout`` the result says so (``exit_code`` None) and the command is left to end by its
        own limits.

        Raises:
            RuntimeOperationFailed: the Deployment does not exist or has no running pod.
        """
        return exec_in_pod(self, service, argv, timeout)

    # -- isolation (security incident): a NetworkPolicy, and the ones in its way put back after -------

    def plan_isolation(self, services: Sequence[str] | None = None) -> IsolationPlan:
        """A NetworkPolicy that admits ingress to the pods only from the namespace's own pods (see
        :func:`tasks.kubernetes.isolation.plan_isolation`).

        Raises:
            RuntimeOperationFailed: a named Deployment does not exist, or a NetworkPolicy of the name
                this tool uses exists and was not made by it.
        """
        return isolation.plan_isolation(self, services)

    def isolate(self, plan: IsolationPlan) -> list[ChangeRecord]:
        """Create (or correct) the isolation policies and limit the recorded ones; each is read back."""
        return isolation.isolate(self, plan)

    def end_isolation(self, plan: IsolationPlan) -> list[ChangeRecord]:
        """Delete the isolation policies and put each limited policy back as recorded (created again
        when it was deleted meanwhile); read back and compared with the record."""
        return isolation.end_isolation(self, plan)
