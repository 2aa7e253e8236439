"""Two workers, one target: while another process (its own working directory, its own Prefect flow
run) holds the lock of an exclusive operation, the flow run here (another working directory) refuses
naming that run and changes nothing; once the other is gone, the same flow run acts.

Real services: PostgreSQL (the locks, the database flows), Redis (FLUSHDB), the Kubernetes emulator
(deploy, rollback, recover-data), the file storage and uploads directories, the Prefect test server.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from bullmq import Queue

from flows.backup import prune_backups, restore_database
from flows.incidents import flush_redis, recover_data, security_incident
from flows.releases import deploy_release, rollback_release
from flows.uploads import cleanup_uploads, restore_quarantine
from tasks import backup, incidents, locks, scaling
from tasks.errors import LockBusy
from tasks.releases import ReleaseStore
from tasks.runtime import get_runtime
from tasks.settings import load_settings
from tests.fixtures.kube import IMAGE_REPO
from tests.fixtures.locks import OtherWorker, lock_held_elsewhere

pytestmark = [pytest.mark.flow, pytest.mark.integration]

V1, V3 = f"{IMAGE_REPO}:v1", f"{IMAGE_REPO}:v3"


@pytest.fixture
def here(ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test process works in its own directory (B); the other worker gets another (A)."""
    cwd = ops_env["tmp"] / "worker-b"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # The run here waits a little for the other worker, then refuses.
    monkeypatch.setenv("OPS_RUNTIME__LOCK_TIMEOUT_SECONDS", "1")
    return ops_env["tmp"] / "worker-a"


def refused(state: Any, other: OtherWorker) -> str:
    """The flow run failed with LockBusy naming ``other``; returns the message."""
    assert state.is_failed(), state
    with pytest.raises(LockBusy) as error:
        state.result()
    other.assert_named_in(str(error.value))
    return str(error.value)


@pytest.fixture
def kube_env(prefect_harness, ops_env, kube_stack, monkeypatch, here):
    env = {
        "OPS_RUNTIME__KIND": "kubernetes",
        "OPS_RUNTIME__KUBERNETES__API_URL": kube_stack.url,
        "OPS_RUNTIME__KUBERNETES__NAMESPACE": kube_stack.namespace,
        "OPS_RUNTIME__STATE_DIR": str(ops_env["tmp"] / "state"),
        "OPS_RUNTIME__READY_TIMEOUT_SECONDS": "20",
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
        "OPS_HEALTH__URLS": json.dumps([kube_stack.health_url]),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ops_env


def _images() -> dict[str, str | None]:
    return {s.name: s.image for s in get_runtime(load_settings()).list_services()}


def test_deploy_refuses_while_another_worker_deploys_the_environment(kube_env, here):
    settings = load_settings()
    with lock_held_elsewhere(locks.release_lock_name(settings, "staging"), "deploy-release", here) as other:
        state = deploy_release(image_tag="v3", timeout_seconds=20, return_state=True)
        assert "deploy or rollback of staging" in refused(state, other)
        assert ReleaseStore.from_settings(settings).all() == []
        assert _images() == {"backend": V1, "worker": V1}
    done = deploy_release(image_tag="v3", timeout_seconds=20)
    assert done["release"]["status"] == "succeeded"
    assert _images() == {"backend": V3, "worker": V3}


def test_rollback_refuses_while_another_worker_holds_the_environment(kube_env, here):
    settings = load_settings()
    store = ReleaseStore.from_settings(settings)
    store.record(
        kind="baseline", status="recorded", images={"backend": V1, "worker": V1}, migration_revision=None
    )
    runtime = get_runtime(settings)
    runtime.set_images({"backend": V3})
    runtime.wait_ready(["backend"], 20)
    store.record(
        kind="deploy", status="succeeded", images={"backend": V3, "worker": V1}, migration_revision=None
    )
    with lock_held_elsewhere(locks.release_lock_name(settings, "staging"), "rollback-release", here) as other:
        refused(rollback_release(approved=True, timeout_seconds=20, return_state=True), other)
        assert _images()["backend"] == V3
        assert len(store.all()) == 2
    rollback_release(approved=True, timeout_seconds=20)
    assert _images()["backend"] == V1


def test_uploads_cleanup_refuses_while_another_worker_cleans_the_root(prefect_harness, ops_env, here):
    root: Path = ops_env["tmp"] / "uploads"
    old = root / "a" / "old.bin"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x" * 10)
    stamp = time.time() - 90 * 86400
    os.utime(old, (stamp, stamp))
    with lock_held_elsewhere(locks.uploads_lock_name(root), "cleanup-uploads", here) as other:
        refused(cleanup_uploads(dry_run=False, older_than_days=30, return_state=True), other)
        assert old.exists()
    report = cleanup_uploads(dry_run=False, older_than_days=30)
    assert report.removal.acted == 1
    assert not old.exists()
    with lock_held_elsewhere(locks.uploads_lock_name(root), "cleanup-uploads", here) as other:
        refused(restore_quarantine(report.run_id, return_state=True), other)
        assert not old.exists()


def test_prune_refuses_while_another_worker_prunes_the_storage(prefect_harness, ops_env, here, monkeypatch):
    monkeypatch.setenv("OPS_BACKUP__KEEP_LAST", "1")
    for tier in ("DAILY", "WEEKLY", "MONTHLY"):
        monkeypatch.setenv(f"OPS_BACKUP__KEEP_{tier}", "0")
    monkeypatch.setenv("OPS_BACKUP__LOCK_TIMEOUT_SECONDS", "1")
    settings = load_settings()
    with psycopg.connect(ops_env["dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
    for _ in range(2):
        backup.create_backup(settings, verify="checksum")
    listed = [m.id for m in backup.list_backups(settings)]
    assert len(listed) == 2
    with lock_held_elsewhere(locks.prune_lock_name(settings), "prune-backups", here) as other:
        refused(prune_backups(confirm=True, return_state=True), other)
        assert [m.id for m in backup.list_backups(settings)] == listed
    result = prune_backups(confirm=True)
    assert len(result["deleted"]) == 1
    assert len(backup.list_backups(settings)) == 1


async def _add_jobs(url: str, queue: str, count: int) -> None:
    q = Queue(queue, {"connection": url})
    try:
        for n in range(count):
            await q.add("work", {"n": n})
    finally:
        await q.close()


def test_flushdb_refuses_while_another_worker_flushes_the_db(prefect_harness, ops_env, here, monkeypatch):
    monkeypatch.setenv("OPS_QUEUE__NAMES", '["ops-lock-flow"]')
    asyncio.run(_add_jobs(ops_env["redis_url"], "ops-lock-flow", 2))
    conn = redis.Redis.from_url(ops_env["redis_url"])
    try:
        size = conn.dbsize()
        assert size > 0
        with lock_held_elsewhere(locks.flushdb_lock_name(load_settings()), "flush-redis", here) as other:
            refused(flush_redis(dry_run=False, approved=True, restart_services=[], return_state=True), other)
            assert conn.dbsize() == size
        assert flush_redis(dry_run=False, approved=True, restart_services=[])["flushed"]
        assert conn.dbsize() == 0
    finally:
        conn.close()


def test_rotation_refuses_while_another_worker_rotates(prefect_harness, ops_env, here, monkeypatch):
    env_file = ops_env["tmp"] / "app.env"
    env_file.write_text("JWT_SECRET=old-jwt\n")
    monkeypatch.setenv("OPS_RUNTIME__STATE_DIR", str(ops_env["tmp"] / "state"))
    monkeypatch.setenv(
        "OPS_INCIDENTS", json.dumps({"app_secrets": ["JWT_SECRET"], "compose_env_file": str(env_file)})
    )
    with lock_held_elsewhere(locks.rotation_lock_name(load_settings()), "security-incident", here) as other:
        state = security_incident(dry_run=False, approved=True, restart=False, return_state=True)
        refused(state, other)
        assert env_file.read_text() == "JWT_SECRET=old-jwt\n"
    done = security_incident(dry_run=False, approved=True, restart=False)
    assert done["outcome"] == "secrets rotated"
    assert incidents.parse_env(env_file.read_text())["JWT_SECRET"] != "old-jwt"


def _run_artifacts(flow_run_id: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert found, "the refused run published its report"
    return "\n".join(json.dumps(a.data) for a in found)


def _widgets(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM widgets").fetchone()
    assert row is not None
    return int(row[0])


def test_recover_data_refuses_while_another_worker_holds_the_database(
    kube_env, kube_stack, here, monkeypatch
):
    dsn, database = kube_env["dsn"], kube_env["database"]
    monkeypatch.setenv("OPS_BACKUP__LOCK_TIMEOUT_SECONDS", "1")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE widgets (id int PRIMARY KEY)")
        conn.execute("INSERT INTO widgets SELECT generate_series(1, 50)")
    settings = load_settings()
    backup.create_backup(settings, verify="checksum")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM widgets WHERE id > 10")
    runtime = get_runtime(settings)
    runtime.scale("worker", 2)
    runtime.wait_ready(["worker"], 20)
    replicas = {r.service: r.replicas for r in scaling.record_replicas(runtime, ["backend", "worker"])}
    name = backup.database_lock_name(database)
    with lock_held_elsewhere(name, "recover-data", here) as other:
        state = recover_data(backup_id="latest", dry_run=False, approved=True, return_state=True)
        refused(state, other)
        assert _widgets(dsn) == 10
        # Refused before it stopped anything: no scale to 0 (and back) while the other worker recovers.
        assert "scale to 0" not in _run_artifacts(state.state_details.flow_run_id)
        assert {
            r.service: r.replicas for r in scaling.record_replicas(runtime, ["backend", "worker"])
        } == replicas
        # restore-database takes the same lock and names the holder the same way.
        refused(restore_database(backup_id="latest", dry_run=False, approved=True, return_state=True), other)
        assert _widgets(dsn) == 10
    done = recover_data(backup_id="latest", dry_run=False, approved=True)
    assert done["outcome"] == "recovered"
    assert _widgets(dsn) == 50
