"""Health paging decisions, channel payloads and the routes file, as plain functions."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest

from tasks.errors import SettingsError
from tasks.notifications import Message, PagingState, automation_for, decide, load_routes, render
from tasks.notifications.delivery import backoff_delays
from tasks.notifications.runs import mask_parameters

ROOT = Path(__file__).resolve().parents[2]


def _run(state: PagingState, statuses: dict[str, str]) -> tuple[PagingState, list[tuple[str, str]]]:
    new, decisions = decide(state, statuses, threshold=2)
    return new, [(d.kind, d.check) for d in decisions]


def test_page_after_two_unhealthy_once_then_resolve_with_the_same_key() -> None:
    state = PagingState(stack="s")
    state, sent = _run(state, {"redis": "unhealthy", "postgres": "healthy"})
    assert sent == []
    state, sent = _run(state, {"redis": "unhealthy", "postgres": "healthy"})
    assert sent == [("trigger", "redis")]
    key = state.checks["redis"].open_dedup_key
    state, sent = _run(state, {"redis": "unhealthy", "postgres": "healthy"})
    assert sent == []
    new, decisions = decide(state, {"redis": "healthy", "postgres": "healthy"}, threshold=2)
    assert [(d.kind, d.dedup_key) for d in decisions] == [("resolve", key)]
    assert new.checks["redis"].open_dedup_key is None
    assert new.checks["redis"].consecutive_unhealthy == 0


def test_a_healthy_check_between_resets_the_count_and_degraded_is_told_once() -> None:
    state = PagingState(stack="s")
    state, _ = _run(state, {"redis": "unhealthy"})
    state, sent = _run(state, {"redis": "degraded"})
    assert sent == [("degraded", "redis")]
    state, sent = _run(state, {"redis": "degraded"})
    assert sent == []
    state, sent = _run(state, {"redis": "unhealthy"})
    assert sent == []


def test_an_open_page_of_a_removed_check_is_resolved() -> None:
    state = PagingState(stack="s")
    for _ in range(2):
        state, _ = _run(state, {"http-app": "unhealthy"})
    state, sent = _run(state, {})
    assert sent == [("resolve", "http-app")]
    assert state.checks == {}


def test_payloads_per_channel() -> None:
    message = Message(
        title="backup <failed>",
        severity="critical",
        fields=(("Error", "disk full"),),
        links=(("Run", "http://ui/runs/1"),),
        action="trigger",
        dedup_key="k1",
    )
    assert render.slack_payload(message)["text"].startswith(":rotating_light: *backup &lt;failed&gt;*")
    pd = render.pagerduty_payload(message, "rk")
    assert pd["event_action"] == "trigger"
    assert pd["dedup_key"] == "k1"
    assert pd["payload"]["custom_details"] == {"Error": "disk full"}
    resolve = render.pagerduty_payload(Message(title="x", action="resolve", dedup_key="k1"), "rk")
    assert resolve == {"routing_key": "rk", "event_action": "resolve", "dedup_key": "k1"}
    mail = render.email_message(message, sender="a@x", to=["b@x", "c@x"])
    assert mail["Subject"] == "[critical] backup <failed>"
    assert mail["To"] == "b@x, c@x"
    assert backoff_delays(4, 2.0) == [2.0, 4.0, 8.0]


def test_parameters_are_masked() -> None:
    shown = mask_parameters(
        {"api_token": "t0k3n", "url": "https://u:pw123@h/x", "note": "hunter22 inside", "n": 3}, ["hunter22"]
    )
    assert shown == {"api_token": "***", "url": '"https://u:***@h/x"', "note": '"*** inside"', "n": 3}


def test_routes_file_declares_every_route_of_the_issue() -> None:
    routes = {r.name: r for r in load_routes(ROOT / "automations.yaml")}
    assert set(routes) == {
        "flow-run-failed",
        "health",
        "security",
        "certificate-renewal-failed",
        "wal-rpo-exceeded",
        "backup-failed",
        "maintenance",
    }
    failed = automation_for(
        routes["flow-run-failed"], UUID(int=1), ["backup-database", "health-check", "diagnose"]
    )
    related = failed.trigger.match_related.root  # type: ignore[union-attr]
    # health-check pages through the health route (N in a row), not on each failed run.
    assert related["prefect.resource.name"] == ["backup-database", "diagnose"]
    assert failed.trigger.expect == {
        "prefect.flow-run.Failed",
        "prefect.flow-run.Crashed",
        "prefect.flow-run.TimedOut",
    }
    assert routes["maintenance"].to == ["users", "status"]
    # Renewal failed, or a certificate expires within 7 days with no successful renewal: DevOps.
    assert set(routes["certificate-renewal-failed"].expect) == {
        "swagger2mcp-ops.certificate.renewal-failed",
        "swagger2mcp-ops.certificate.expiring",
    }
    assert routes["certificate-renewal-failed"].to == ["devops"]
    # The WAL archive's RPO past its threshold, and a failed PITR drill, reach DevOps.
    assert routes["wal-rpo-exceeded"].expect == ["swagger2mcp-ops.wal.rpo-exceeded"]
    assert routes["wal-rpo-exceeded"].to == ["devops"]
    assert "pitr-drill" in routes["backup-failed"].flows  # type: ignore[operator]


def test_invalid_routes_file_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "automations.yaml"
    path.write_text("routes:\n  - name: x\n    kind: event\n    expect: [a.b]\n    to: []\n")
    with pytest.raises(SettingsError, match=r"routes.0.to"):
        load_routes(path)
