"""The incident flows under the Prefect harness, against the real PostgreSQL and Redis, the scram
PostgreSQL cluster and the Kubernetes emulator: FLUSHDB offer, security incident (evidence + rotation),
outage triage with a rollback after a recent release, data recovery with scale-to-zero and back."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from bullmq import Queue
from prefect.flow_runs import resume_flow_run

from flows.incidents import flush_redis, outage_triage, recover_data, security_incident
from tasks import backup, incidents
from tasks.releases import ReleaseStore
from tasks.runtime import get_runtime
from tasks.settings import load_settings
from tests.fixtures.incidents import can_login
from tests.fixtures.kube import IMAGE_REPO

pytestmark = [pytest.mark.flow, pytest.mark.integration]


def _artifact_texts(keys: list[str]) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    return "\n".join(json.dumps(a.data) for a in found)


# --- flush-redis ----------------------------------------------------------------------------------


async def _add_jobs(url: str, queue: str, count: int) -> None:
    q = Queue(queue, {"connection": url})
    try:
        for n in range(count):
            await q.add("work", {"n": n})
    finally:
        await q.close()


def test_flush_redis_dry_run_declined_and_approved(prefect_harness, ops_env, monkeypatch):
    url = ops_env["redis_url"]
    monkeypatch.setenv("OPS_QUEUE__NAMES", '["ops-inc-flow"]')
    asyncio.run(_add_jobs(url, "ops-inc-flow", 2))
    conn = redis.Redis.from_url(url)
    try:
        conn.set("session:1", "x")
        size = conn.dbsize()

        dry = flush_redis()
        assert dry["outcome"] == "dry-run"
        assert dry["keys"] == size
        assert dry["groups"]["session:*"] == 1
        assert dry["jobs"]["ops-inc-flow"]["waiting"] == 2
        assert conn.dbsize() == size

        declined = flush_redis(dry_run=False, approval_timeout_seconds=2, return_state=True)
        assert declined.is_failed()
        with pytest.raises(Exception, match="never resumed"):
            declined.result()
        assert conn.dbsize() == size

        flushed = flush_redis(dry_run=False, approved=True)
        assert flushed["flushed"]
        assert flushed["keys_after"] == 0
        assert flushed["restarted"] == []  # runtime none: the report says to restart the worker by hand
        assert conn.dbsize() == 0
    finally:
        conn.close()
    published = _artifact_texts(["flush-redis-teststack"])
    assert "not applied: nobody approved within 2s" in published
    assert "restart worker yourself" in published


# --- security-incident ----------------------------------------------------------------------------


def test_security_incident_evidence_then_rotation(
    prefect_harness, ops_env, scram_postgres, rotation_role, monkeypatch
):
    tmp: Path = ops_env["tmp"]
    env_file = tmp / "app.env"
    env_file.write_text(
        f"DATABASE_URL=postgresql://{rotation_role.name}:{rotation_role.password}@127.0.0.1:{scram_postgres.port}/postgres\n"
        "JWT_SECRET=old-jwt\nKEEP=1\n"
    )
    monkeypatch.setenv("OPS_POSTGRES__DSN", scram_postgres.admin_dsn)
    monkeypatch.setenv("OPS_RUNTIME__RELEASE_STORE", str(tmp / "releases"))
    monkeypatch.setenv(
        "OPS_INCIDENTS",
        json.dumps(
            {
                "rotate_roles": [rotation_role.name],
                "role_secret_keys": {rotation_role.name: ["DATABASE_URL"]},
                "app_secrets": ["JWT_SECRET"],
                "compose_env_file": str(env_file),
            }
        ),
    )
    before = env_file.read_text()

    dry = security_incident()
    assert dry["outcome"] == "evidence collected; rotation dry run"
    assert dry["evidence"]["verified"]
    assert "postgres/pg_stat_activity.json" in dry["evidence"]["files"]
    assert {s["outcome"] for s in dry["rotation"]["secrets"]} == {"would rotate"}
    assert env_file.read_text() == before
    store = tmp / "backups"
    assert (store / dry["evidence"]["prefix"] / "manifest.json").is_file()

    done = security_incident(dry_run=False, approved=True)
    assert done["outcome"] == "secrets rotated"
    assert done["health"] == "healthy"
    steps = {s["step"]: s["outcome"] for s in done["steps"]}
    assert steps["rotate secrets"] == "ok"
    assert steps["rolling restart"] == "skipped"  # runtime none
    new_url = incidents.parse_env(env_file.read_text())["DATABASE_URL"]
    new_jwt = incidents.parse_env(env_file.read_text())["JWT_SECRET"]
    assert can_login(new_url)
    assert not can_login(scram_postgres.dsn(rotation_role.name, rotation_role.password))
    new_password = urlsplit(new_url).password
    assert new_password
    published = json.dumps(done) + _artifact_texts(
        [
            "security-incident-teststack",
            "security-incident-teststack-secrets",
            "security-incident-teststack-steps",
        ]
    )
    assert new_password not in published
    assert new_jwt not in published
    assert incidents.fingerprint(new_jwt) in published


# --- Kubernetes: outage triage and data recovery ---------------------------------------------------


@pytest.fixture
def kube_env(prefect_harness, ops_env, kube_stack, monkeypatch):
    tmp: Path = ops_env["tmp"]
    env = {
        "OPS_RUNTIME__KIND": "kubernetes",
        "OPS_RUNTIME__KUBERNETES__API_URL": kube_stack.url,
        "OPS_RUNTIME__KUBERNETES__NAMESPACE": kube_stack.namespace,
        "OPS_RUNTIME__RELEASE_STORE": str(tmp / "releases"),
        "OPS_RUNTIME__READY_TIMEOUT_SECONDS": "20",
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
        "OPS_HEALTH__URLS": json.dumps([kube_stack.health_url]),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ops_env


def _replicas(cluster) -> dict[str, int]:
    from kubernetes import client

    apps = client.AppsV1Api(cluster.api())
    return {
        d.metadata.name: d.spec.replicas for d in apps.list_namespaced_deployment(cluster.namespace).items
    }


def test_outage_triage_proposes_and_performs_a_rollback(kube_env, kube_stack):
    settings = load_settings()
    runtime = get_runtime(settings)
    store = ReleaseStore.from_settings(settings)
    v1, v2 = f"{IMAGE_REPO}:v1", f"{IMAGE_REPO}:v2"
    baseline = store.record(
        kind="baseline", status="recorded", images={"backend": v1, "worker": v1}, migration_revision=None
    )
    runtime.set_images({"backend": v2})
    runtime.wait_ready(["backend"], 20)
    store.record(
        kind="deploy", status="succeeded", images={"backend": v2, "worker": v1}, migration_revision=None
    )

    declined = outage_triage(approval_timeout_seconds=2)
    assert declined["outcome"] == "rollback-declined"
    assert declined["health"] == "unhealthy"
    assert declined["proposal"]["target_release"] == baseline.id
    assert any(c["kind"] == "release" for c in declined["recent_changes"])
    assert {s["name"]: s["image"] for s in declined["services"]}["backend"] == v2

    done = outage_triage(approved=True)
    assert done["outcome"] == "rolled-back"
    assert {s.name: s.image for s in runtime.list_services()} == {"backend": v1, "worker": v1}
    assert done["rollback"]["health"]["status"] == "healthy"

    calm = outage_triage()
    assert calm["outcome"] == "healthy"
    assert calm["proposal"] is None


def _paused_run(flow_name: str, timeout: float = 90) -> Any:
    """The id of the first paused run of ``flow_name`` (waiting for its approval form)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), limit=50
            )
            for run in runs:
                if run.state is not None and run.state.is_paused():
                    return run.id
            time.sleep(0.5)
    raise AssertionError(f"no {flow_name} run paused for approval within {timeout}s")


def _widgets(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM widgets").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def damaged_database(kube_env, kube_stack, monkeypatch):
    """50 widgets backed up, then 40 deleted; the worker runs 2 replicas (counts to restore)."""
    dsn = kube_env["dsn"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE widgets (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO widgets SELECT g, 'w' || g FROM generate_series(1, 50) g")
    settings = load_settings()
    manifest = backup.create_backup(settings, verify="checksum")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM widgets WHERE id > 10")
    runtime = get_runtime(settings)
    runtime.scale("worker", 2)
    runtime.wait_ready(["worker"], 20)
    return manifest


def test_recover_data_dry_run_then_restore_with_scale_to_zero_and_back(
    kube_env, kube_stack, damaged_database, monkeypatch
):
    monkeypatch.setenv("OPS_INCIDENTS__VALIDATION_QUERIES", '["SELECT count(*) = 50 FROM widgets"]')
    dsn = kube_env["dsn"]
    backup_id = damaged_database.id

    plan = recover_data(backup_id=backup_id)
    assert plan["outcome"] == "dry-run"
    assert plan["replicas"] == {"backend": 1, "worker": 2}
    assert _widgets(dsn) == 10
    assert _replicas(kube_stack) == {"backend": 1, "worker": 2}

    # Not a dry run, but no approval arrives: nothing is scaled or restored.
    unapproved = recover_data(
        backup_id=backup_id, dry_run=False, approval_timeout_seconds=2, return_state=True
    )
    assert unapproved.is_failed()
    assert _widgets(dsn) == 10
    assert _replicas(kube_stack) == {"backend": 1, "worker": 2}

    # A backup taken after the damage is "latest"; the approval form picks the good one instead.
    backup.create_backup(load_settings(), verify="checksum")
    results: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: results.update(
            state=recover_data(backup_id="latest", dry_run=False, return_state=True)
        )
    )
    thread.start()
    try:
        paused = _paused_run("recover-data")
        resume_flow_run(
            paused,
            run_input={"approve": True, "approver": "test", "backup_id": backup_id, "reason": "INC-42"},
        )
    finally:
        thread.join(timeout=180)
    done = results["state"].result()
    assert done["outcome"] == "recovered"
    assert done["backup_id"] == backup_id
    assert _widgets(dsn) == 50
    assert done["validations"] == [
        {"query": "SELECT count(*) = 50 FROM widgets", "ok": True, "value": "True"}
    ]
    assert _replicas(kube_stack) == {"backend": 1, "worker": 2}
    steps = [(s["step"], s["outcome"]) for s in done["steps"]]
    assert steps == [
        ("assess: backups, plan, replicas", "ok"),
        ("approval", "ok"),
        ("stop writes: scale to 0", "ok"),
        (f"restore {backup_id}", "ok"),
        ("verify data: validation queries", "ok"),
        ("resume: scale back to the recorded counts", "ok"),
        ("health check", "ok"),
    ]
    assert all(s["duration_s"] >= 0 and s["started_at"] for s in done["steps"])
    assert done["health"] == "healthy"


def test_recover_data_scales_back_when_validation_fails(kube_env, kube_stack, damaged_database, monkeypatch):
    monkeypatch.setenv("OPS_INCIDENTS__VALIDATION_QUERIES", '["SELECT count(*) = 999 FROM widgets"]')
    state = recover_data(backup_id=damaged_database.id, dry_run=False, approved=True, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="validation failed") as caught:
        state.result()
    # The message says where the app writes now, what to do next, and the health after.
    message = str(caught.value)
    kept = _databases(kube_env["database"] + "__old_")
    assert len(kept) == 1
    assert f"swap_back={kept[0]}" in message
    assert "already runs on, and writes to, the restored data" in message
    assert "another backup_id" in message
    assert "Health after: healthy" in message
    assert _widgets(kube_env["dsn"].rsplit("/", 1)[0] + "/" + kept[0]) == 10  # the damaged one, kept
    assert _widgets(kube_env["dsn"]) == 50  # restored; the check was the stricter one
    assert _replicas(kube_stack) == {"backend": 1, "worker": 2}
    report = _artifact_texts(["recover-data-teststack"])
    assert "resume: scale back to the recorded counts | " in report
    assert "stop writes: scale to 0" in report
    assert "health check" in report


def test_recover_data_takes_the_incident_s_validation_queries(
    kube_env, kube_stack, damaged_database, monkeypatch
):
    """The setting is the default set; this incident's queries come as a parameter, shown in the plan."""
    monkeypatch.setenv("OPS_INCIDENTS__VALIDATION_QUERIES", '["SELECT count(*) > 0 FROM widgets"]')
    queries = [
        "SELECT count(*) = 50 FROM widgets",
        "SELECT NOT EXISTS (SELECT 1 FROM widgets WHERE name = '')",
    ]
    # An empty query is refused before anything (no lock, no scale, no restore).
    bad = recover_data(
        backup_id=damaged_database.id,
        dry_run=False,
        approved=True,
        validation_queries=[" "],
        return_state=True,
    )
    assert bad.is_failed()
    assert "validation_queries" in (bad.message or "")
    assert _widgets(kube_env["dsn"]) == 10
    assert _replicas(kube_stack) == {"backend": 1, "worker": 2}

    plan = recover_data(backup_id=damaged_database.id, validation_queries=queries)
    assert plan["validation_queries"] == queries
    report = _artifact_texts(["recover-data-teststack"])
    assert "Validation queries after the restore (from the run's validation_queries)" in report
    assert all(q in report for q in queries)

    done = recover_data(
        backup_id=damaged_database.id, dry_run=False, approved=True, validation_queries=queries
    )
    assert [v["query"] for v in done["validations"]] == queries
    assert all(v["ok"] for v in done["validations"])
    assert _widgets(kube_env["dsn"]) == 50

    # Without the parameter the setting's set is used, and the plan says so.
    default = recover_data(backup_id=damaged_database.id)
    assert default["validation_queries"] == ["SELECT count(*) > 0 FROM widgets"]
    assert "(from incidents.validation_queries)" in _artifact_texts(["recover-data-teststack"])


def _databases(prefix: str) -> list[str]:
    from tests.fixtures.core import PG_ADMIN_DSN

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", (prefix,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def test_recover_data_reads_replicas_again_after_the_approval(
    kube_env, kube_stack, damaged_database, monkeypatch
):
    monkeypatch.setenv("OPS_INCIDENTS__VALIDATION_QUERIES", '["SELECT count(*) = 50 FROM widgets"]')
    runtime = get_runtime(load_settings())
    results: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: results.update(
            state=recover_data(backup_id=damaged_database.id, dry_run=False, return_state=True)
        )
    )
    thread.start()
    try:
        paused = _paused_run("recover-data")
        # While the approval waits, someone scales the worker up: that is what runs now.
        runtime.scale("worker", 3)
        runtime.wait_ready(["worker"], 20)
        resume_flow_run(
            paused,
            run_input={
                "approve": True,
                "approver": "test",
                "backup_id": damaged_database.id,
                "reason": "test recovery",
            },
        )
    finally:
        thread.join(timeout=180)
    done = results["state"].result()
    assert done["outcome"] == "recovered"
    assert done["replicas"] == {"backend": 1, "worker": 3}
    assert _replicas(kube_stack) == {"backend": 1, "worker": 3}
    stop = next(s for s in done["steps"] if s["step"] == "stop writes: scale to 0")
    assert "worker 2 -> 3" in stop["detail"]


def test_security_incident_on_kubernetes_collects_logs_rotates_secret_and_restarts(
    kube_env, kube_stack, monkeypatch
):
    import base64

    from kubernetes import client

    core = client.CoreV1Api(kube_stack.api())
    apps = client.AppsV1Api(kube_stack.api())
    namespace = kube_stack.namespace
    core.create_namespaced_secret(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "app-secrets", "namespace": namespace},
            "data": {"JWT_SECRET": base64.b64encode(b"old").decode()},
        },
    )
    try:
        monkeypatch.setenv("OPS_INCIDENTS__APP_SECRETS", '["JWT_SECRET"]')
        monkeypatch.setenv("OPS_INCIDENTS__KUBERNETES_SECRET", "app-secrets")
        before = {
            d.metadata.name: d.metadata.annotations.get("deployment.kubernetes.io/revision")
            for d in apps.list_namespaced_deployment(namespace).items
        }
        result = security_incident(dry_run=False, approved=True)
        assert result["outcome"] == "secrets rotated"
        assert result["health"] == "healthy"
        root = kube_env["tmp"] / "backups" / result["evidence"]["prefix"]
        assert "backend started with" in (root / "logs/backend.log").read_text()
        assert "worker started with" in (root / "logs/worker.log").read_text()
        new = base64.b64decode(
            core.read_namespaced_secret("app-secrets", namespace).data["JWT_SECRET"]
        ).decode()
        assert new != "old"
        assert result["rotation"]["secrets"][0]["new_fingerprint"] == incidents.fingerprint(new)
        assert new not in json.dumps(result)
        for deployment in apps.list_namespaced_deployment(namespace).items:
            assert "kubectl.kubernetes.io/restartedAt" in (
                deployment.spec.template.metadata.annotations or {}
            )
            revision = deployment.metadata.annotations.get("deployment.kubernetes.io/revision")
            assert int(revision) > int(before[deployment.metadata.name])
    finally:
        core.delete_namespaced_secret("app-secrets", namespace)
