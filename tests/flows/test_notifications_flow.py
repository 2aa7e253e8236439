"""Escalation against a real Prefect server (the session's test server runs the automations), a real
runner process serving notify-event, an HTTP receiver (Slack, PagerDuty v2, generic JSON) and an SMTP
server with STARTTLS and AUTH (aiosmtpd), all on 127.0.0.1."""

from __future__ import annotations

import email
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events.worker import EventsWorker

from deployments.automations import ROUTES_FILE, notify_deployment_id, project_flow_names
from flows.notifications import notify_test
from tasks.incidents import verify_evidence_bundle
from tasks.notifications import apply_routes, load_routes
from tasks.notifications.routes import NAME_PREFIX
from tasks.storage import LocalStorage
from tests.fixtures.notify_receivers import (
    SMTP_PASSWORD,
    SMTP_USER,
    Receiver,
    SmtpInbox,
    closed_port,
    notify_runner,
)

PD_KEY = "PdRoutingKeyHidden"


def channels_env(receiver: Receiver, smtp_port: int, **extra: dict[str, Any]) -> dict[str, str]:
    channels = {
        "chat": {"kind": "slack", "audiences": ["chat", "on-call"], "url": receiver.url("/slack")},
        "pager": {
            "kind": "pagerduty",
            "audiences": ["on-call"],
            "routing_key": PD_KEY,
            "url": receiver.url("/pd"),
        },
        "oncall-mail": {
            "kind": "email",
            "audiences": ["on-call"],
            "to": ["oncall@example.com", "lead@example.com"],
        },
        "devops-hook": {
            "kind": "webhook",
            "audiences": ["devops"],
            "url": receiver.url("/devops"),
            "authorization": "Bearer HookTokenHidden",
        },
        **extra,
    }
    return {
        "OPS_NOTIFICATIONS__CHANNELS": json.dumps(channels),
        "OPS_NOTIFICATIONS__SMTP__HOST": "127.0.0.1",
        "OPS_NOTIFICATIONS__SMTP__PORT": str(smtp_port),
        "OPS_NOTIFICATIONS__SMTP__USERNAME": SMTP_USER,
        "OPS_NOTIFICATIONS__SMTP__PASSWORD": SMTP_PASSWORD,
        "OPS_NOTIFICATIONS__SMTP__VERIFY_TLS": "false",
        "OPS_NOTIFICATIONS__SMTP__SENDER": "ops@example.com",
        "OPS_NOTIFICATIONS__BACKOFF_SECONDS": "0.2",
        "OPS_NOTIFICATIONS__UI_URL": "http://ui.example.com",
    }


@pytest.mark.usefixtures("prefect_harness")
def test_notify_test_reaches_every_channel(
    ops_env: dict[str, Any],
    receiver: Receiver,
    smtp_server: tuple[int, SmtpInbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, inbox = smtp_server
    for key, value in channels_env(receiver, port).items():
        monkeypatch.setenv(key, value)
    state = notify_test(return_state=True)
    assert state.is_completed(), state.message
    rows = {row["channel"]: row for row in state.result()}
    assert set(rows) == {"chat", "pager", "oncall-mail", "devops-hook"}
    assert all(row["delivered"] for row in rows.values()), rows
    (slack,) = receiver.bodies("/slack")
    assert "notification test" in slack["text"]
    trigger, resolve = receiver.bodies("/pd")
    assert trigger["event_action"] == "trigger"
    assert resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"]
    assert trigger["routing_key"] == PD_KEY
    (hook,) = receiver.bodies("/devops")
    assert hook["event"] == "swagger2mcp-ops.notification.test"
    sender, recipients, raw = inbox.messages[0]
    assert sender == "ops@example.com"
    assert sorted(recipients) == ["lead@example.com", "oncall@example.com"]
    assert "notification test" in email.message_from_bytes(raw)["Subject"]


@pytest.mark.usefixtures("prefect_harness")
def test_channel_down_is_retried_reported_and_fails_only_the_test(
    ops_env: dict[str, Any], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.status["/broken"] = 500
    channels = {
        "refused": {
            "kind": "slack",
            "audiences": ["chat"],
            "url": f"http://127.0.0.1:{closed_port()}/hook/SecretPath",
        },
        "broken": {"kind": "webhook", "audiences": ["chat"], "url": receiver.url("/broken")},
        "fine": {"kind": "slack", "audiences": ["chat"], "url": receiver.url("/slack")},
    }
    monkeypatch.setenv("OPS_NOTIFICATIONS__CHANNELS", json.dumps(channels))
    monkeypatch.setenv("OPS_NOTIFICATIONS__ATTEMPTS", "3")
    monkeypatch.setenv("OPS_NOTIFICATIONS__BACKOFF_SECONDS", "0.2")
    started = time.monotonic()
    state = notify_test(return_state=True)
    assert state.is_failed()
    assert "2 of 3 channels did not receive the test" in (state.message or "")
    assert "SecretPath" not in (state.message or "")
    # The working channel got its message once; the broken one was tried three times, with backoff.
    assert len(receiver.bodies("/slack")) == 1
    assert len(receiver.bodies("/broken")) == 3
    assert time.monotonic() - started >= 0.6
    EventsWorker.drain_all()
    # The two failure events may reach the server apart: wait for both, not only the first.
    events = _events(
        "swagger2mcp-ops.notification.failed",
        until=lambda found: {"refused", "broken"} <= {e["payload"]["channel"] for e in found},
    )
    channels_failed = {e["payload"]["channel"] for e in events}
    assert {"refused", "broken"} <= channels_failed
    assert all("SecretPath" not in json.dumps(e) for e in events)


def _events(name: str, until: Callable[[list[dict[str, Any]]], bool] = bool) -> list[dict[str, Any]]:
    import asyncio

    async def read() -> list[dict[str, Any]]:
        async with get_client() as client:
            response = await client._client.post(
                "/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50}
            )
            response.raise_for_status()
            return list(response.json()["events"])

    deadline = time.monotonic() + 30
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = asyncio.run(read())
        if until(found):
            break
        time.sleep(0.5)
    return found


def _read_route_automations() -> dict[str, int]:
    with get_client(sync_client=True) as client:
        names = [a.name for a in client.read_automations() if a.name.startswith(NAME_PREFIX)]
    return {name: names.count(name) for name in names}


@pytest.fixture
def routes_applied(ops_env: dict[str, Any]) -> Iterator[None]:
    routes = load_routes(ROUTES_FILE)
    apply_routes(routes, notify_deployment_id(), project_flow_names())
    try:
        yield
    finally:
        # Other tests of the session must not trigger notifications.
        apply_routes([], notify_deployment_id(), project_flow_names())


@pytest.mark.usefixtures("prefect_harness")
def test_applying_the_routes_twice_leaves_one_automation_per_route() -> None:
    routes = load_routes(ROUTES_FILE)
    deployment_id = notify_deployment_id()
    first = apply_routes(routes, deployment_id, project_flow_names())
    second = apply_routes(routes, deployment_id, project_flow_names())
    try:
        assert set(second.updated) == {r.automation_name for r in routes}
        assert not second.created
        assert not second.deleted
        assert set(first.created) | set(first.updated) == set(second.updated)
        assert _read_route_automations() == {r.automation_name: 1 for r in routes}
    finally:
        removed = apply_routes([], deployment_id, project_flow_names())
    assert set(removed.deleted) == {r.automation_name for r in routes}
    assert _read_route_automations() == {}


def _finished_notify_runs() -> int:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[notify_deployment_id()])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(
                        any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]
                    )
                )
            ),
        )
    return len(runs)


def _wait_notify_runs(count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _finished_notify_runs() >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"expected {count} finished notify-event runs, got {_finished_notify_runs()}")


@pytest.mark.usefixtures("prefect_harness", "routes_applied")
def test_failed_flow_run_pages_on_call_with_the_incident_bundle(
    ops_env: dict[str, Any],
    receiver: Receiver,
    smtp_server: tuple[int, SmtpInbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.backup import verify_backup

    port, inbox = smtp_server
    env = {
        **ops_env["env"],
        **channels_env(receiver, port),
        "OPS_TEST_RUNNER_LOG": str(ops_env["tmp"] / "runner.log"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _finished_notify_runs()
    with notify_runner(env):
        state = verify_backup(backup_id="no-such-backup", level="checksum", return_state=True)
        assert state.is_failed()
        EventsWorker.drain_all()
        (slack,) = receiver.wait_for("/slack")
        (page,) = receiver.wait_for("/pd")
        (devops,) = receiver.wait_for("/devops")
        inbox.wait_for(1)
        _wait_notify_runs(before + 2)
    text = slack["text"]
    assert "verify-backup" in text
    assert "Failed" in text
    assert "*Failing step:* resolve-backup" in text
    assert "no-such-backup" in text  # the parameters and the error
    assert "http://ui.example.com/runs/flow-run/" in text
    assert "Incident bundle" in text
    assert page["event_action"] == "trigger"
    assert page["payload"]["severity"] == "critical"
    assert page["dedup_key"].startswith("swagger2mcp-ops-teststack-flow-run-")
    bundle_url = page["links"][1]["href"]
    assert bundle_url.startswith("file://")
    # The bundle the page links to is in storage and matches its sha256 manifest.
    root = ops_env["tmp"] / "backups"
    prefix, bundle_id = bundle_url.removeprefix(f"file://{root}/").rstrip("/").rsplit("/", 1)
    verification = verify_evidence_bundle(LocalStorage(root), prefix, bundle_id)
    assert verification.ok, verification.summary()
    assert verification.files_checked >= 3
    assert devops["event"] == "prefect.flow-run.Failed"
    assert "verify-backup" in devops["title"]
    _, recipients, raw = inbox.messages[0]
    assert sorted(recipients) == ["lead@example.com", "oncall@example.com"]
    assert "verify-backup" in email.message_from_bytes(raw)["Subject"]
    everything = json.dumps(receiver.posts) + raw.decode(errors="replace")
    for secret in (SMTP_PASSWORD, "HookTokenHidden"):
        assert secret not in everything


@pytest.mark.usefixtures("prefect_harness", "routes_applied")
def test_health_pages_after_two_unhealthy_checks_and_resolves_when_healthy(
    ops_env: dict[str, Any],
    receiver: Receiver,
    smtp_server: tuple[int, SmtpInbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.health import health_check

    port, _ = smtp_server
    env = {
        **ops_env["env"],
        **channels_env(receiver, port),
        "OPS_HEALTH__URLS": json.dumps([receiver.url("/app-health")]),
        "OPS_TEST_RUNNER_LOG": str(ops_env["tmp"] / "runner.log"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _finished_notify_runs()
    receiver.status["/app-health"] = 503
    with notify_runner(env):
        for number in (1, 2, 3):
            assert (
                health_check(fail_when_unhealthy=False, return_state=True).result()["status"] == "unhealthy"
            )
            EventsWorker.drain_all()
            _wait_notify_runs(before + number)
            pages = receiver.bodies("/pd")
            # None on the 1st, one trigger on the 2nd, no repeat on the 3rd.
            assert len(pages) == (0 if number == 1 else 1), pages
        receiver.status["/app-health"] = 200
        assert health_check(fail_when_unhealthy=False, return_state=True).result()["status"] == "healthy"
        EventsWorker.drain_all()
        _wait_notify_runs(before + 4)
    trigger, resolve = receiver.bodies("/pd")
    assert trigger["event_action"] == "trigger"
    assert resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"]
    assert "HTTP 503" in json.dumps(trigger["payload"]["custom_details"])
    slack = [body["text"] for body in receiver.bodies("/slack")]
    assert any("unhealthy 2 times in a row" in t for t in slack)
    assert any("recovered" in t for t in slack)
