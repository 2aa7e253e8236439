"""restart-services under the Prefect harness, on Compose (real Docker Engine) and Kubernetes (emulator)."""

from __future__ import annotations

import time

import pytest

from flows.services import restart_services
from tests.fixtures.docker_engine import SLOW_LISTEN_SECONDS, compose_env

pytestmark = [pytest.mark.flow, pytest.mark.integration]


def test_restart_changes_start_marker_and_checks_health(prefect_harness, runtime_target):
    runtime = runtime_target.runtime()
    before = {s.name: s.started_at for s in runtime.list_services()}
    time.sleep(1.1)
    result = restart_services(services=["worker"], timeout_seconds=30, health_scope="services")
    assert result["services"] == ["worker"]
    assert result["changes"][0]["changed"]
    assert result["health"]["status"] == "healthy"
    assert list(result["health"]["checks"]) == [f"http:{runtime_target.health_url}"]
    after = {s.name: s.started_at for s in runtime.list_services()}
    assert after["worker"] != before["worker"]
    assert after["backend"] == before["backend"]  # only what was named restarts


def test_restart_of_an_unknown_service_fails_and_changes_nothing(prefect_harness, runtime_target):
    runtime = runtime_target.runtime()
    before = {s.name: s.started_at for s in runtime.list_services()}
    state = restart_services(services=["nope"], timeout_seconds=10, return_state=True)
    assert state.is_failed()
    assert {s.name: s.started_at for s in runtime.list_services()} == before


def test_restart_waits_until_a_slow_backend_answers(
    prefect_harness, slow_compose_stack, tmp_path, monkeypatch
):
    """No Docker healthcheck: "running" is not "ready". The health URL is polled until it answers."""
    for key, value in compose_env(slow_compose_stack, tmp_path / "releases").items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    result = restart_services(services=["backend"], timeout_seconds=40, health_scope="services")
    assert result["health"]["status"] == "healthy"
    # The server listens SLOW_LISTEN_SECONDS after its start, so the wait saw it come up.
    assert time.monotonic() - started >= SLOW_LISTEN_SECONDS - 1
    readiness = result["readiness"]
    assert readiness["services_ready_seconds"] < SLOW_LISTEN_SECONDS
    assert readiness["checks"][f"http:{slow_compose_stack.health_url}"] >= SLOW_LISTEN_SECONDS - 2
