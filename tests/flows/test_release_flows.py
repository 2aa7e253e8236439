"""deploy-release and rollback-release under the Prefect harness, on Compose (real Docker Engine) and
Kubernetes (emulator): bad tags roll back to v1, a rollback returns to the first release, and a
rollback across a recorded database migration is refused unless forced."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import httpx
import psycopg
import pytest

from flows.releases import deploy_release, rollback_release
from tasks.releases import ReleaseStore
from tasks.settings import load_settings
from tests.fixtures.docker_engine import SLOW_LISTEN_SECONDS, compose_env

pytestmark = [pytest.mark.flow, pytest.mark.integration]


@pytest.fixture
def release_env(prefect_harness, ops_env, runtime_target, monkeypatch):
    """PostgreSQL/Redis of this test (ops_env) plus the runtime target's OPS_* (which win)."""
    for key, value in runtime_target.env.items():
        monkeypatch.setenv(key, value)
    return runtime_target


def _version(url: str) -> str:
    response = httpx.get(url, timeout=5)
    return f"{response.status_code} {response.json().get('version')}"


def _store() -> ReleaseStore:
    return ReleaseStore.from_settings(load_settings())


def test_deploy_then_rollback_returns_to_the_first_release(release_env):
    result = deploy_release(image_tag="v3", timeout_seconds=30)
    assert result["release"]["status"] == "succeeded"
    assert result["release"]["images"] == {
        "backend": release_env.images["v3"],
        "worker": release_env.images["v3"],
    }
    assert _version(release_env.health_url) == "200 v3"

    rolled = rollback_release(approved=True, timeout_seconds=30)
    assert rolled["health"]["status"] == "healthy"
    assert _version(release_env.health_url) == "200 v1"
    runtime = release_env.runtime()
    assert {s.name: s.image for s in runtime.list_services()} == {
        "backend": release_env.images["v1"],
        "worker": release_env.images["v1"],
    }
    kinds = [(r.kind, r.status) for r in _store().all()]
    assert kinds == [("baseline", "recorded"), ("deploy", "succeeded"), ("rollback", "succeeded")]


@pytest.mark.parametrize(
    ("bad", "runtime_target"),
    [("unhealthy", "compose"), ("unhealthy", "kubernetes"), ("missing", "kubernetes")],
    indirect=["runtime_target"],
)
def test_bad_tag_rolls_back_to_v1(release_env, bad):
    # Kubernetes switches the template before the pull fails (ErrImagePull): that switch is rolled back.
    images = {"backend": release_env.images["v2"] if bad == "unhealthy" else release_env.missing_image}
    state = deploy_release(images=images, timeout_seconds=15, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="rolled back"):
        state.result()
    assert _version(release_env.health_url) == "200 v1"
    records = _store().all()
    assert records[-1].kind == "deploy"
    assert records[-1].status == "rolled-back"
    assert records[-1].note
    # The recorded good release is still v1: a later rollback target is not the failed one.
    assert _store().latest_good().images["backend"] == release_env.images["v1"]


def test_rollback_across_a_migration_is_refused_unless_forced(release_env, ops_env):
    with psycopg.connect(ops_env["dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('a1b2c3')")
    deploy_release(image_tag="v3", timeout_seconds=30)
    with psycopg.connect(ops_env["dsn"], autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'd4e5f6'")

    state = rollback_release(approved=True, timeout_seconds=30, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="d4e5f6"):
        state.result()
    assert _version(release_env.health_url) == "200 v3"  # nothing changed

    forced = rollback_release(approved=True, force=True, timeout_seconds=30)
    assert forced["forced_across_migrations"] == ["d4e5f6"]
    assert _version(release_env.health_url) == "200 v1"
    assert _store().all()[0].migration_revision == "a1b2c3"


def test_deploy_refuses_another_environment_before_any_change(release_env):
    state = deploy_release(environment="production", image_tag="v3", return_state=True)
    assert state.is_failed()
    assert _version(release_env.health_url) == "200 v1"
    assert _store().all() == []


def _paused_flow_run_id(timeout: float = 120) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                )
            )
            if runs:
                return str(runs[0].id)
            time.sleep(0.5)
    raise AssertionError("the rollback never paused for approval")


@pytest.mark.parametrize("runtime_target", ["kubernetes"], indirect=True)
def test_rollback_waits_for_approval_and_a_refusal_changes_nothing(release_env):
    from prefect.flow_runs import resume_flow_run

    deploy_release(image_tag="v3", timeout_seconds=30)
    outcome = {}

    def run() -> None:
        outcome["state"] = rollback_release(
            timeout_seconds=30, approval_timeout_seconds=180, return_state=True
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        run_id = _paused_flow_run_id()
        resumed = resume_flow_run(
            run_id, run_input={"approve": False, "approver": "ops", "reason": "not during the demo"}
        )
        if inspect.isawaitable(resumed):
            asyncio.run(resumed)
    finally:
        thread.join(180)
    assert outcome["state"].is_failed()
    with pytest.raises(Exception, match="not applied: rejected by ops: not during the demo"):
        outcome["state"].result()
    assert _version(release_env.health_url) == "200 v3"
    assert [r.kind for r in _store().all()] == ["baseline", "deploy"]


BAD_RELEASE_INPUTS = [
    {"image_tag": "1.0;id"},
    {"image_tag": "$(id)"},
    {"image_tag": "-rf"},
    {"image_tag": "1.0\nid"},
    {"images": {"backend": "s2m-ops-test/app:$(id)"}},
    {"images": {"backend": "-rf"}},
    {"images": {"backend": "s2m-ops-test/app:v3\nid"}},
    {"images": {"backend": "s2m-ops-test/App:v3"}},
]


def test_deploy_refuses_tags_and_images_outside_the_oci_grammar_before_anything(release_env):
    for bad in BAD_RELEASE_INPUTS:
        state = deploy_release(timeout_seconds=15, return_state=True, **bad)
        assert state.is_failed(), bad
        assert "Nothing was done" in (state.message or ""), (bad, state.message)
        with pytest.raises(Exception, match="is not a"):
            state.result()
    # Nothing recorded, nothing switched: the store is empty and v1 still serves.
    assert _store().all() == []
    assert _version(release_env.health_url) == "200 v1"
    assert {s.image for s in release_env.runtime().list_services()} == {release_env.images["v1"]}


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return str(max(found, key=lambda a: a.created).data)


@pytest.mark.parametrize("runtime_target", ["compose"], indirect=True)
def test_a_missing_image_on_compose_switches_nothing_and_says_so(release_env):
    state = deploy_release(
        images={"backend": release_env.missing_image}, timeout_seconds=15, return_state=True
    )
    assert state.is_failed()
    message = state.message or ""
    assert "nothing was switched" in message
    assert "rolled back" not in message
    assert "health is back" not in message
    assert _version(release_env.health_url) == "200 v1"
    records = _store().all()
    assert records[-1].kind == "deploy"
    assert records[-1].status == "not-switched"
    report = _artifact("deploy-release-staging")
    assert "failed, nothing switched" in report
    assert "Rolling back" not in report
    assert _store().latest_good().images["backend"] == release_env.images["v1"]


@pytest.fixture
def slow_env(prefect_harness, ops_env, slow_compose_stack, tmp_path, monkeypatch):
    for key, value in compose_env(slow_compose_stack, tmp_path / "releases").items():
        monkeypatch.setenv(key, value)
    return slow_compose_stack


def test_a_good_release_whose_server_needs_seconds_to_listen_is_not_rolled_back(slow_env):
    """Compose without a Docker healthcheck calls the container ready at once; the health URL is
    polled until the timeout, and the report shows how long each wait took."""
    result = deploy_release(image_tag="v3", timeout_seconds=40)
    assert result["release"]["status"] == "succeeded"
    assert _version(slow_env.health_url) == "200 v3"
    readiness = result["readiness"]
    assert readiness["services_ready_seconds"] < SLOW_LISTEN_SECONDS
    assert readiness["checks"][f"http:{slow_env.health_url}"] >= SLOW_LISTEN_SECONDS - 2
    report = _artifact("deploy-release-staging")
    assert "## Readiness" in report
    assert f"http:{slow_env.health_url}" in report
    assert [(r.kind, r.status) for r in _store().all()] == [("baseline", "recorded"), ("deploy", "succeeded")]


@pytest.fixture
def migrating_env(prefect_harness, mg_env, alembic_env, monkeypatch):
    """A database with a pending Alembic migration, and no runtime (nothing can stop the writers)."""
    from tests.fixtures.migrations import ADD_NAME, use

    use(monkeypatch, alembic_env([ADD_NAME]))
    monkeypatch.setenv("OPS_RUNTIME__RELEASE_STORE", str(mg_env["tmp"] / "releases"))
    return mg_env


def _alembic_revision(dsn: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        exists = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]
        if not exists:
            return None
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_a_migration_that_would_be_refused_leaves_the_deploy_not_applied(migrating_env):
    state = deploy_release(
        images={"backend": "s2m-ops-test/app:v3"}, migrate=True, approved=True, return_state=True
    )
    assert state.is_failed()
    message = state.message or ""
    assert "not applied:" in message
    assert 'writes_policy="keep-running"' in message
    assert "OPS_MIGRATIONS__MAINTENANCE_ON_ARGV" in message
    assert "No service was switched" in message
    assert "rolled back" not in message
    assert _alembic_revision(migrating_env["dsn"]) is None
    assert _store().all() == []
    report = _artifact("deploy-release-staging")
    assert "**not applied**" in report
    assert "writes_policy" in report


def test_writes_policy_reaches_the_migration(migrating_env):
    # keep-running lets the migration run without a way to stop the writers; with no runtime the
    # images cannot be switched afterwards, and the deploy says that nothing was switched.
    state = deploy_release(
        images={"backend": "s2m-ops-test/app:v3"},
        migrate=True,
        approved=True,
        writes_policy="keep-running",
        return_state=True,
    )
    assert state.is_failed()
    assert "nothing was switched" in (state.message or "")
    assert _alembic_revision(migrating_env["dsn"]) == "r1_add_name"
    report = _artifact("deploy-release-staging")
    assert "writes_policy=keep-running" in report
    assert "The migration was applied" in report
    assert _store().all()[-1].status == "not-switched"
