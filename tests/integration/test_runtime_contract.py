"""The Runtime contract, run against both runtimes: Compose on a real Docker Engine, and Kubernetes on
the kmock emulator with its controller fixture."""

from __future__ import annotations

import time

import httpx
import pytest

from tasks.runtime import EXIT_NOT_FOUND, RuntimeOperationFailed, ServicesNotReady

pytestmark = pytest.mark.integration


def _health(url: str) -> tuple[int, dict]:
    response = httpx.get(url, timeout=5)
    return response.status_code, response.json()


def _statuses(runtime) -> dict:
    return {s.name: s for s in runtime.list_services()}


def test_list_services_shows_v1_ready(runtime_target):
    runtime = runtime_target.runtime()
    statuses = _statuses(runtime)
    assert set(statuses) >= {"backend", "worker"}
    for name in ("backend", "worker"):
        assert statuses[name].image == runtime_target.images["v1"]
        assert statuses[name].healthy, statuses[name]
    assert _health(runtime_target.health_url) == (200, {"status": "ok", "version": "v1"})


def test_logs_tail_of_a_service(runtime_target):
    text = runtime_target.runtime().logs("worker", tail=20)
    assert "worker" in text
    assert "v1" in text


def test_restart_changes_the_start_marker(runtime_target):
    runtime = runtime_target.runtime()
    before = _statuses(runtime)["worker"].started_at
    time.sleep(1.1)  # Docker's start times have whole-second resolution in some places
    records = runtime.restart(["worker"])
    assert [r.target for r in records] == ["worker"]
    assert records[0].changed
    assert records[0].commands
    runtime.wait_ready(["worker"], timeout=30)
    after = _statuses(runtime)["worker"].started_at
    assert after is not None
    assert after != before


def test_set_images_then_history_and_undo(runtime_target):
    runtime = runtime_target.runtime()
    v1, v3 = runtime_target.images["v1"], runtime_target.images["v3"]
    records = runtime.set_images({"backend": v3})
    assert records[0].changed
    assert records[0].before["image"] == v1
    runtime.wait_ready(["backend"], timeout=30)
    assert _health(runtime_target.health_url) == (200, {"status": "ok", "version": "v3"})
    # Setting the same image again changes nothing.
    again = runtime.set_images({"backend": v3})
    assert not again[0].changed
    if runtime_target.kind == "kubernetes":
        history = runtime.history("backend")
        assert [r.images["backend"] for r in history] == [v1, v3]
        assert history[-1].current
        record = runtime.rollback("backend")
        assert record.after["image"] == v1
        runtime.wait_ready(["backend"], timeout=30)
        assert _health(runtime_target.health_url)[1]["version"] == "v1"
    else:
        # Compose keeps no history of its own: rollback needs a recorded release.
        with pytest.raises(RuntimeOperationFailed, match="no recorded release"):
            runtime.rollback("backend")


def test_image_that_does_not_exist_fails(runtime_target):
    runtime = runtime_target.runtime()
    with pytest.raises((RuntimeOperationFailed, ServicesNotReady)):
        runtime.set_images({"backend": runtime_target.missing_image})
        runtime.wait_ready(["backend"], timeout=10)


def test_scale_worker(runtime_target):
    runtime = runtime_target.runtime()
    record = runtime.scale("worker", 2)
    assert record.changed
    assert record.after["replicas"] == "2"
    statuses = runtime.wait_ready(["worker"], timeout=30)
    assert statuses[0].desired == 2
    assert statuses[0].ready == 2
    assert not runtime.scale("worker", 2).changed
    assert runtime.scale("worker", 1).changed


def test_unknown_service_is_refused_before_any_change(runtime_target):
    runtime = runtime_target.runtime()
    with pytest.raises(RuntimeOperationFailed):
        runtime.restart(["nope"])
    assert _statuses(runtime)["backend"].image == runtime_target.images["v1"]


def test_resource_usage_answers_per_service(runtime_target):
    usage = {u.name: u for u in runtime_target.runtime().resource_usage()}
    if runtime_target.kind == "compose":
        assert usage["backend"].available
        assert usage["backend"].memory_bytes is not None
        assert usage["backend"].memory_bytes > 0
    else:
        # The emulator has no metrics API: reported as unavailable, not an error.
        assert not usage["backend"].available
        assert "metrics" in (usage["backend"].note or "")


def test_exec_runs_a_command_in_a_running_instance(runtime_target, request):
    if runtime_target.kind == "kubernetes":
        request.getfixturevalue("kube_exec")  # pods/exec, which the emulator lacks
    runtime = runtime_target.runtime()
    result = runtime.exec("backend", ["sh", "-c", "echo out; echo err >&2; exit 3"], 20)
    assert (result.exit_code, result.stdout.strip(), result.stderr.strip()) == (3, "out", "err")
    assert result.instance.startswith("backend") or "-backend-" in result.instance
    assert runtime.exec("backend", ["s2m-no-such-command"], 20).exit_code == EXIT_NOT_FOUND
    with pytest.raises(RuntimeOperationFailed):
        runtime.exec("nope", ["true"], 20)
