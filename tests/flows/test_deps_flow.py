"""The update-dependencies flow under the Prefect harness: real npm and git against verdaccio, the real
Docker Engine for the build, and deploy-release on a Compose staging stack; also as security-incident's
patch-and-redeploy step."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.states import State

from flows.dependencies import update_dependencies
from tests.fixtures.docker_engine import ComposeStack, DockerEngine
from tests.fixtures.npm_registry import APP_BASE_IMAGE, PACKAGE, FixtureApp, tree_digest
from tests.fixtures.ports import claim_port

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.flow, pytest.mark.integration]


def artifacts(state: State[Any]) -> dict[str, Any]:
    """The artifacts of one flow run, by key."""
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return {a.key: a for a in found}


def artifact_text(state: State[Any]) -> str:
    return json.dumps({key: a.data for key, a in artifacts(state).items()})


@pytest.fixture
def deps_env(npm_fixture_app: FixtureApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A live checkout of the fixture app and OPS_* settings pointing the flow at it and the registry."""
    live = npm_fixture_app.copy_to(tmp_path / "live")
    values = {
        "OPS_STACK": "teststack",
        "OPS_RUNTIME__KIND": "none",
        "OPS_DEPENDENCIES__SOURCE_DIR": str(live),
        "OPS_DEPENDENCIES__WORK_DIR": str(tmp_path / "work"),
        "OPS_DEPENDENCIES__REGISTRY_URL": npm_fixture_app.registry.url,
        "OPS_DEPENDENCIES__REGISTRY_TOKEN": npm_fixture_app.registry.token,
        "OPS_DEPENDENCIES__NPM_CACHE_DIR": str(tmp_path / "npm-cache"),
        "OPS_DEPENDENCIES__IMAGE_NAME": APP_BASE_IMAGE,
        "OPS_DEPENDENCIES__INSTALL_TIMEOUT_SECONDS": "120",
        "OPS_DEPENDENCIES__TEST_TIMEOUT_SECONDS": "60",
        "OPS_DEPENDENCIES__BUILD_TIMEOUT_SECONDS": "120",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {
        "live": live,
        "digest": tree_digest(live),
        "token": npm_fixture_app.registry.token,
        "tmp": tmp_path,
    }


def test_failing_tests_stop_before_build(deps_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    marker = deps_env["tmp"] / "build-ran"
    monkeypatch.setenv("OPS_DEPENDENCIES__BUILD_ARGV", json.dumps(["touch", str(marker)]))

    state = update_dependencies(scope="latest", deploy_to_staging=False, return_state=True)

    assert state.is_failed()
    assert "nothing was built or deployed" in (state.message or "")
    assert not marker.exists()
    found = artifacts(state)
    report = found["dependencies-teststack"].data
    assert "**tests failed**" in report
    assert "leftpad-ops must export a function" in report  # the test output is in the report
    assert "| leftpad-ops | 1.0.0 | 2.0.0 |" in report
    assert "node_modules/leftpad-ops" in found["dependencies-teststack-lockfile"].data
    assert deps_env["token"] not in artifact_text(state)
    assert tree_digest(deps_env["live"]) == deps_env["digest"]


def test_bad_parameters_fail_before_any_side_effect(deps_env: dict[str, Any]) -> None:
    state = update_dependencies(scope="everything", deploy_to_staging=False, return_state=True)  # type: ignore[arg-type]
    assert state.is_failed()
    # runtime.kind is "none" here: there is no staging to deploy to.
    state = update_dependencies(scope="security", deploy_to_staging=True, return_state=True)
    assert state.is_failed()
    assert "deploy_to_staging needs settings that point at staging" in (state.message or "")
    assert not (deps_env["tmp"] / "work").exists()
    assert tree_digest(deps_env["live"]) == deps_env["digest"]


def git(repo: Path, *args: str) -> str:
    """A git command in ``repo`` (the operator's own git, as the report's promote step uses it)."""
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout


def test_a_run_with_nothing_to_update_leaves_no_branch(deps_env: dict[str, Any]) -> None:
    first = update_dependencies(scope="security", deploy_to_staging=False, build=False, return_state=True)
    assert first.is_completed(), first.message
    done = first.result()
    assert done["outcome"] == "tested and committed"
    # The operator promotes the update as the report says, then the next run finds nothing to do.
    live = deps_env["live"]
    git(live, "fetch", "--quiet", done["working_copy"], done["branch"])
    git(live, "merge", "--quiet", "--ff-only", "FETCH_HEAD")

    second = update_dependencies(scope="security", deploy_to_staging=False, build=False, return_state=True)

    assert second.is_completed(), second.message
    summary = second.result()
    assert summary["outcome"] == "nothing to update"
    assert summary["branch"] is None
    assert summary["commit"] is None
    # The working copy holds only the branch it was cloned on: no update branch at the unchanged base.
    branches = git(Path(summary["working_copy"]), "branch", "--format=%(refname:short)").split()
    assert branches == ["main"]
    assert "deps/" not in artifacts(second)["dependencies-teststack"].data


def test_old_working_copies_are_removed_and_nothing_else(
    deps_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPS_DEPENDENCIES__KEEP_WORKING_COPIES", "1")
    work = deps_env["tmp"] / "work"
    # What an operator keeps beside the runs: none of it was made by a run, so none of it may go.
    foreign_dir = work / "notes"
    foreign_dir.mkdir(parents=True)
    (foreign_dir / "keep.txt").write_text("mine")
    look_alike = work / "20000101T000000Z-security-abcdef"  # a run's name, but no marker
    look_alike.mkdir()
    (look_alike / "data").write_text("mine")
    outside = deps_env["tmp"] / "outside"
    outside.mkdir()
    (outside / ".swagger2mcp-ops-run").write_text("{}")
    (work / "20000101T000000Z-minor-abcdef").symlink_to(outside)  # a run's name and marker, via a link
    (work / "plain-file").write_text("mine")
    foreign = sorted(p.name for p in work.iterdir())

    failed = update_dependencies(scope="latest", deploy_to_staging=False, build=False, return_state=True)
    assert failed.is_failed()  # the app's tests fail on 2.0.0
    first = next(p for p in work.iterdir() if p.name not in foreign)
    assert (first / "src" / "node_modules").is_dir()

    state = update_dependencies(scope="security", deploy_to_staging=False, build=False, return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    newest = Path(summary["working_copy"]).parent
    # The failed run's clone (node_modules included) is gone; the newest run and the rest remain.
    assert sorted(p.name for p in work.iterdir()) == sorted([*foreign, newest.name])
    assert summary["working_copies_removed"] == [str(first)]
    assert (newest / "src" / "node_modules" / PACKAGE).is_dir()
    assert (foreign_dir / "keep.txt").read_text() == "mine"
    assert (look_alike / "data").read_text() == "mine"
    assert (outside / ".swagger2mcp-ops-run").is_file()
    assert first.name in artifacts(state)["dependencies-teststack"].data


STAGING_PORT = claim_port()  # this area's own port, apart from the runtime tests' stacks
# The runtime tests' app images: app-backend serves /cgi-bin/health on $HEALTH_PORT (503 on :v2).
STAGING_COMPOSE = f"""\
services:
  backend:
    image: {APP_BASE_IMAGE}:v1
    network_mode: host
    init: true
    command: ["app-backend"]
    environment:
      HEALTH_PORT: "{STAGING_PORT}"
    stop_grace_period: 2s
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:{STAGING_PORT}/cgi-bin/health"]
      interval: 1s
      timeout: 2s
      retries: 2
  worker:
    image: {APP_BASE_IMAGE}:v1
    network_mode: host
    init: true
    command: ["app-worker"]
    stop_grace_period: 2s
"""


@pytest.fixture
def staging_stack(docker_engine: DockerEngine, tmp_path: Path) -> Iterator[ComposeStack]:
    """A Compose staging stack (backend + worker at v1) on this area's own health port; down after."""
    directory = tmp_path / "staging"
    directory.mkdir()
    compose_file = directory / "docker-compose.yml"
    compose_file.write_text(STAGING_COMPOSE)
    stack = ComposeStack(
        engine=docker_engine,
        project=f"s2mdeps{uuid.uuid4().hex[:8]}",
        directory=directory,
        compose_file=compose_file,
        health_url=f"http://127.0.0.1:{STAGING_PORT}/cgi-bin/health",
    )
    try:
        stack.compose("up", "--detach", "--wait", "--wait-timeout", "60", "--pull", "never")
        yield stack
    finally:
        with contextlib.suppress(Exception):
            stack.compose("down", "--timeout", "2", "--remove-orphans")


def staging_env(stack: Any, tmp_path: Path) -> dict[str, str]:
    """OPS_RUNTIME__* for the Compose staging stack (as the runtime contract tests set them); the
    deploy's full health check also needs ``ops_env`` (PostgreSQL and Redis)."""
    return {
        "OPS_RUNTIME__KIND": "compose",
        "OPS_RUNTIME__ENVIRONMENT": "staging",
        "OPS_RUNTIME__RELEASE_STORE": str(tmp_path / "releases"),
        "OPS_RUNTIME__READY_TIMEOUT_SECONDS": "30",
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
        "OPS_RUNTIME__COMPOSE__PROJECT": stack.project,
        "OPS_RUNTIME__COMPOSE__FILES": json.dumps([str(stack.compose_file)]),
        "OPS_RUNTIME__COMPOSE__DOCKER_HOST": stack.engine.host,
        "OPS_RUNTIME__COMPOSE__DOCKER_CONFIG": str(stack.engine.config_dir),
        "OPS_RUNTIME__COMPOSE__PULL": "never",
        "OPS_RUNTIME__COMPOSE__STOP_TIMEOUT_SECONDS": "2",
        "OPS_HEALTH__URLS": json.dumps([stack.health_url]),
        "OPS_HEALTH__TIMEOUT_SECONDS": "3",
    }


def running_images(stack: Any) -> dict[str, str]:
    """Service -> image of the stack's running containers, as the engine reports them."""
    client = stack.engine.client()
    try:
        containers = client.containers.list(filters={"label": f"com.docker.compose.project={stack.project}"})
        return {c.labels["com.docker.compose.service"]: c.attrs["Config"]["Image"] for c in containers}
    finally:
        client.close()


def test_clean_update_goes_all_the_way_to_staging(
    ops_env: dict[str, Any],
    deps_env: dict[str, Any],
    staging_stack: ComposeStack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in staging_env(staging_stack, deps_env["tmp"]).items():
        monkeypatch.setenv(key, value)

    state = update_dependencies(scope="security", deploy_to_staging=True, return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["outcome"] == "deployed to staging"
    assert summary["changes"] == [
        {"package": PACKAGE, "path": f"node_modules/{PACKAGE}", "from": "1.0.0", "to": "1.0.1"}
    ]
    assert summary["advisories_fixed"]["high"] == 1
    assert summary["advisories_remaining"] == 0
    assert summary["image"].startswith(f"{APP_BASE_IMAGE}:deps-")
    # The tested update is committed on its branch in the working copy.
    wc = Path(summary["working_copy"])
    lock = json.loads((wc / "package-lock.json").read_text())
    assert lock["packages"][f"node_modules/{PACKAGE}"]["version"] == "1.0.1"
    assert (wc / ".git" / "refs" / "heads" / summary["branch"]).read_text().strip() == summary["commit"]
    # Staging runs the built image, healthy.
    assert set(running_images(staging_stack).values()) == {summary["image"]}
    found = artifacts(state)
    assert {
        "dependencies-teststack",
        "dependencies-teststack-changes",
        "dependencies-teststack-lockfile",
    } <= set(found)
    assert summary["branch"] in found["dependencies-teststack"].data
    assert deps_env["token"] not in artifact_text(state)
    assert httpx.get(staging_stack.health_url, timeout=5).status_code == 200
    assert tree_digest(deps_env["live"]) == deps_env["digest"]


def test_failed_staging_deploy_ends_failed_with_staging_on_the_previous_release(
    ops_env: dict[str, Any],
    deps_env: dict[str, Any],
    staging_stack: ComposeStack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in staging_env(staging_stack, deps_env["tmp"]).items():
        monkeypatch.setenv(key, value)
    # The update's image is built on the app version whose health endpoint answers 503.
    broken = ["docker", "build", "--build-arg", f"BASE={APP_BASE_IMAGE}:v2", "-t", "{ref}", "{context}"]
    monkeypatch.setenv("OPS_DEPENDENCIES__BUILD_ARGV", json.dumps(broken))
    before = running_images(staging_stack)

    state = update_dependencies(scope="security", deploy_to_staging=True, return_state=True)

    assert state.is_failed()
    assert "rolled staging back to the previous release" in (state.message or "")
    assert (
        running_images(staging_stack)
        == before
        == {"backend": f"{APP_BASE_IMAGE}:v1", "worker": f"{APP_BASE_IMAGE}:v1"}
    )
    assert httpx.get(staging_stack.health_url, timeout=5).status_code == 200
    report = artifacts(state)["dependencies-teststack"].data
    assert "staging deploy failed, staging back on the previous release" in report
    assert tree_digest(deps_env["live"]) == deps_env["digest"]


def test_an_image_name_the_services_do_not_run_is_refused_before_any_build(
    ops_env: dict[str, Any],
    deps_env: dict[str, Any],
    staging_stack: ComposeStack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in staging_env(staging_stack, deps_env["tmp"]).items():
        monkeypatch.setenv(key, value)
    # The default image name: not the repository staging runs (s2m-ops-test/app).
    monkeypatch.delenv("OPS_DEPENDENCIES__IMAGE_NAME")
    before = running_images(staging_stack)

    state = update_dependencies(scope="security", deploy_to_staging=True, return_state=True)

    assert state.is_failed()
    message = state.message or ""
    assert "OPS_DEPENDENCIES__IMAGE_NAME" in message
    assert f"OPS_DEPENDENCIES__IMAGE_NAME={APP_BASE_IMAGE}" in message  # the value that would work
    assert "swagger2mcp-backend" in message
    assert not (deps_env["tmp"] / "work").exists()  # no working copy, no install, no build
    client = staging_stack.engine.client()
    try:
        assert client.images.list(name="swagger2mcp-backend") == []
    finally:
        client.close()
    assert running_images(staging_stack) == before


def test_security_incident_patches_and_redeploys_through_update_dependencies(
    ops_env: dict[str, Any],
    deps_env: dict[str, Any],
    staging_stack: ComposeStack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Security incident step 4: update-dependencies (security) as a subflow, with its staging deploy,
    both runs linked from the incident's report."""
    from flows.incidents import security_incident

    for key, value in staging_env(staging_stack, deps_env["tmp"]).items():
        monkeypatch.setenv(key, value)
    before = running_images(staging_stack)

    dry = security_incident(patch_and_redeploy=True)
    assert dry["patch"] == {
        "planned_only": True,
        "deploy_to_staging": True,
        "runs": [],
        "summary": {},
    }
    assert not (deps_env["tmp"] / "work").exists()
    assert running_images(staging_stack) == before

    done = security_incident(dry_run=False, approved=True, patch_and_redeploy=True)

    assert done["outcome"] == "patched and deployed to staging"
    runs = {r["flow"]: r for r in done["patch"]["runs"]}
    assert set(runs) == {"update-dependencies", "deploy-release"}
    assert {r["state"] for r in runs.values()} == {"Completed"}
    image = done["patch"]["summary"]["image"]
    assert image.startswith(f"{APP_BASE_IMAGE}:deps-")
    assert set(running_images(staging_stack).values()) == {image}
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["security-incident-teststack"]))
        )
    report = "\n".join(str(a.data) for a in found)
    for run in runs.values():
        assert f"http://127.0.0.1:4200/runs/flow-run/{run['id']}" in report
    assert "Also: isolate" not in report
    assert deps_env["token"] not in report
