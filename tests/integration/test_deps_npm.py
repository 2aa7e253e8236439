"""Dependency updates with the real npm and git against a real registry (verdaccio, no uplinks).

The registry holds ``leftpad-ops`` 1.0.0 (advisory 1099001, high, ``<1.0.1``), 1.0.1, 1.1.0 and 2.0.0
(breaks the API); the fixture app's tests pass on 1.x and fail on 2.0.0.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import SecretStr

from tasks import dependencies as deps
from tasks.errors import CommandError, ParameterError, SettingsError
from tasks.settings import DependenciesSettings, load_settings
from tests.fixtures.docker_engine import RuntimeTarget
from tests.fixtures.npm_registry import ADVISORY_ID, APP_BASE_IMAGE, PACKAGE, FixtureApp, tree_digest

pytestmark = pytest.mark.integration


def _env(app: FixtureApp, tmp_path: Path) -> deps.NpmEnvironment:
    settings = DependenciesSettings(
        registry_url=app.registry.url,
        registry_token=SecretStr(app.registry.token),
        npm_cache_dir=tmp_path / "npm-cache",
        install_timeout_seconds=120,
        audit_timeout_seconds=60,
        test_timeout_seconds=60,
    )
    return deps.npm_environment(settings, tmp_path / "run")


def _prepared(
    app: FixtureApp, tmp_path: Path, branch: str
) -> tuple[deps.NpmEnvironment, deps.WorkingCopy, Path]:
    live = app.copy_to(tmp_path / "live")
    env = _env(app, tmp_path)
    wc = deps.create_working_copy(env, live, tmp_path / "run" / "src", branch)
    deps.install(env, wc)
    return env, wc, live


def _plan(
    env: deps.NpmEnvironment, wc: deps.WorkingCopy, scope: str
) -> tuple[deps.AuditReport, deps.UpdatePlan]:
    report = deps.audit(env, wc.path)
    plan = deps.plan_updates(
        scope,
        report,
        deps.outdated(env, wc.path),
        deps.read_lockfile(wc.lockfile_path),
        deps.read_lockfile(wc.path / "package.json"),
        lambda name: deps.published_versions(env, wc.path, name),
    )
    return report, plan


def test_security_update_in_a_working_copy_fixes_the_advisory(
    npm_fixture_app: FixtureApp, tmp_path: Path
) -> None:
    registry = npm_fixture_app.registry
    requests_before = len(registry.audit_requests)
    live_digest = tree_digest(npm_fixture_app.path)
    env, wc, live = _prepared(npm_fixture_app, tmp_path, "deps/security-test")
    live_copy_digest = tree_digest(live)

    report, plan = _plan(env, wc, "security")
    assert len(registry.audit_requests) > requests_before  # npm asked our advisory endpoint
    assert [(a.package, a.id, a.severity) for a in report.advisories] == [(PACKAGE, str(ADVISORY_ID), "high")]
    assert [a.args for a in plan.actions] == [("install", f"{PACKAGE}@1.0.1")]  # lowest fix, not 1.1.0

    result = deps.apply_updates(env, wc, plan)
    assert result.changed
    assert [(c.name, c.before, c.after) for c in result.changes] == [(PACKAGE, "1.0.0", "1.0.1")]
    assert all(registry.token not in command for command in result.commands)

    after = deps.audit(env, wc.path)
    delta = deps.compare_audits(report, after)
    assert after.advisories == []
    assert delta.fixed_by_severity()["high"] == 1

    tests = deps.run_tests(env, wc)
    assert tests.passed, tests.output
    assert "fixture-app tests passed" in tests.output

    commit = deps.commit_update(env, wc, "Update dependencies (security)")
    assert commit.changed
    assert set(commit.files) == {"package.json", "package-lock.json"}
    branch = env.git(["rev-parse", "--abbrev-ref", "HEAD"], wc.path).stdout.strip()
    assert branch == "deps/security-test"
    assert env.git(["rev-parse", "HEAD"], wc.path).stdout.strip() == commit.commit
    log = env.git(["log", "--format=%an <%ae>|%s", "-1"], wc.path).stdout.strip()
    assert log == "swagger2mcp-ops <swagger2mcp-ops@localhost>|Update dependencies (security)"
    assert env.git(["status", "--porcelain"], wc.path).stdout.strip() == ""
    # The live checkout (and the session's template) are exactly as before.
    assert tree_digest(live) == live_copy_digest
    assert tree_digest(npm_fixture_app.path) == live_digest
    assert deps.installed_version(deps.read_lockfile(live / "package-lock.json"), PACKAGE) == "1.0.0"


def test_minor_moves_within_range_and_latest_breaks_the_tests(
    npm_fixture_app: FixtureApp, tmp_path: Path
) -> None:
    no_advisories = deps.AuditReport((), {})
    env, wc, _ = _prepared(npm_fixture_app, tmp_path / "minor", "deps/minor-test")
    plan = deps.plan_updates("minor", no_advisories, [], {}, {}, lambda _: [])
    result = deps.apply_updates(env, wc, plan)
    assert [(c.name, c.before, c.after) for c in result.changes] == [(PACKAGE, "1.0.0", "1.1.0")]
    assert deps.run_tests(env, wc).passed

    env, wc, _ = _prepared(npm_fixture_app, tmp_path / "latest", "deps/latest-test")
    package_json = deps.read_lockfile(wc.path / "package.json")
    plan = deps.plan_updates(
        "latest", no_advisories, deps.outdated(env, wc.path), {}, package_json, lambda _: []
    )
    assert [a.args for a in plan.actions] == [("install", f"{PACKAGE}@2.0.0")]
    result = deps.apply_updates(env, wc, plan)
    assert [(c.name, c.before, c.after) for c in result.changes] == [(PACKAGE, "1.0.0", "2.0.0")]
    tests = deps.run_tests(env, wc)
    assert not tests.passed
    assert "leftpad-ops must export a function" in tests.output


def test_source_without_git_is_copied_and_committed_as_baseline(
    npm_fixture_app: FixtureApp, tmp_path: Path
) -> None:
    live = npm_fixture_app.copy_to(tmp_path / "live")
    shutil.rmtree(live / ".git")
    digest = tree_digest(live)
    env = _env(npm_fixture_app, tmp_path)
    wc = deps.create_working_copy(env, live, tmp_path / "run" / "src", "deps/copy")
    assert wc.source_commit is None
    assert not (wc.path / "node_modules").exists()  # copied without the live install
    assert env.git(["log", "--format=%s"], wc.path).stdout.startswith("Baseline: copy of")
    deps.install(env, wc)
    assert (wc.path / "node_modules" / PACKAGE / "package.json").is_file()
    assert tree_digest(live) == digest


def test_a_source_without_lockfile_fails_before_anything(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text("{}")
    with pytest.raises(ParameterError, match=r"package-lock\.json"):
        deps.check_source(tmp_path)
    with pytest.raises(ParameterError, match=r"no package\.json"):
        deps.check_source(tmp_path / "missing")


def test_registry_token_is_required_and_masked(npm_fixture_app: FixtureApp, tmp_path: Path) -> None:
    """The registry refuses anonymous installs, so the token path is really used, and masked on failure."""
    live = npm_fixture_app.copy_to(tmp_path / "live")
    bad = DependenciesSettings(
        registry_url=npm_fixture_app.registry.url,
        registry_token=SecretStr("wrong-token-value-123"),
        npm_cache_dir=tmp_path / "npm-cache",
        install_timeout_seconds=60,
    )
    env = deps.npm_environment(bad, tmp_path / "run")
    wc = deps.create_working_copy(env, live, tmp_path / "run" / "src", "deps/bad-token")
    with pytest.raises(CommandError) as failure:
        deps.install(env, wc)
    assert "wrong-token-value-123" not in str(failure.value)


def test_image_name_is_checked_against_what_the_services_run(
    runtime_target: RuntimeTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Compose (the real Docker Engine) and Kubernetes (the emulator): the services run
    ``s2m-ops-test/app:v1``, so only that repository can take a deploy of the built tag."""
    monkeypatch.setenv("OPS_RUNTIME__ENVIRONMENT", "staging")
    monkeypatch.setenv("OPS_DEPENDENCIES__IMAGE_NAME", APP_BASE_IMAGE)
    statuses = deps.check_staging_image(load_settings())
    assert {s.name: s.image for s in statuses} == {
        "backend": f"{APP_BASE_IMAGE}:v1",
        "worker": f"{APP_BASE_IMAGE}:v1",
    }

    monkeypatch.setenv("OPS_DEPENDENCIES__IMAGE_NAME", "registry.example:5000/s2m-ops-test/app")
    with pytest.raises(SettingsError) as refused:
        deps.check_staging_image(load_settings())
    message = str(refused.value)
    assert "backend and worker run s2m-ops-test/app" in message
    assert f"OPS_DEPENDENCIES__IMAGE_NAME={APP_BASE_IMAGE}" in message
