"""The comparison of the ops host's and the backend's network views (plain functions on evidence), and
how an exec's status channel reads."""

from __future__ import annotations

import json

import pytest

from tasks import diagnose as d
from tasks.diagnose import Severity
from tasks.kubernetes import exec_status
from tasks.runtime import EXIT_NOT_FOUND, NoRuntime, RuntimeUnavailable
from tasks.settings import load_settings

OK_TCP = d.View(True, "connected", "socket", (), 0.4)


def _evidence(*comparisons: d.Comparison, runtime: str = "kubernetes") -> d.NetworkViewsEvidence:
    return d.NetworkViewsEvidence(runtime, "backend", "backend-7c9-0", comparisons)


def test_a_name_only_the_backend_reaches_is_information_not_an_outage() -> None:
    evidence = _evidence(
        d.Comparison(
            "tcp",
            "postgres",
            "postgres-service:5432",
            d.View(False, "gaierror: Name or service not known", "socket"),
            d.View(True, "connected", "nc -z"),
        ),
        d.Comparison(
            "dns",
            "postgres-service",
            "postgres-service",
            d.View(False, "gaierror: Name or service not known", "getaddrinfo"),
            d.View(True, "resolved", "getent hosts", ("10.96.0.12",)),
        ),
    )
    findings = d.network_view_findings(evidence)
    assert [f.severity for f in findings] == [Severity.INFO, Severity.INFO]
    assert (
        "inside backend (backend-7c9-0) (probed with nc -z) but not from the ops host" in findings[0].summary
    )
    assert "the app is not affected" in findings[1].summary
    assert [r["same"] for r in evidence.rows()] == ["no", "no"]


def test_unreachable_from_both_points_at_the_service_itself() -> None:
    findings = d.network_view_findings(
        _evidence(
            d.Comparison(
                "tcp",
                "postgres",
                "db:5432",
                d.View(False, "ConnectionRefusedError", "socket"),
                d.View(False, "Connection refused", "nc"),
            )
        )
    )
    assert findings[0].severity is Severity.CRITICAL
    assert findings[0].runbook == d.RB_DATABASE
    assert findings[0].flow == d.FLOW_RESTART


def test_other_addresses_inside_and_agreement() -> None:
    split = d.Comparison(
        "dns",
        "db.internal",
        "db.internal",
        d.View(True, "resolved", "getaddrinfo", ("192.0.2.1",)),
        d.View(True, "resolved", "getent hosts", ("198.51.100.7",)),
    )
    assert "other addresses" in d.network_view_findings(_evidence(split))[0].summary
    same = d.Comparison("tcp", "redis", "redis:6379", OK_TCP, d.View(True, "connected", "node"))
    agreed = d.network_view_findings(_evidence(same))
    assert [f.severity for f in agreed] == [Severity.OK]
    assert "probed with node" in agreed[0].summary


def test_no_runtime_takes_the_ops_host_view_alone() -> None:
    missing = d.View(None, "runtime.kind is 'none': no container to run probes in")
    evidence = d.NetworkViewsEvidence(
        "none",
        "backend",
        None,
        (d.Comparison("tcp", "redis", "127.0.0.1:6379", OK_TCP, missing),),
        (),
        missing.detail,
    )
    findings = d.network_view_findings(evidence)
    assert [f.severity for f in findings] == [Severity.INFO]
    assert "backend's own view was not taken" in findings[0].summary
    assert d.backend_service(load_settings()) == "backend"
    assert d.backend_service(load_settings(diagnose={"backend_service": "api"})) == "api"
    with pytest.raises(RuntimeUnavailable, match=r"runtime\.kind is 'none'"):
        NoRuntime().exec("backend", ["nc", "-z", "db", "5432"], 5)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ({"status": "Success"}, 0),
        (
            {
                "status": "Failure",
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": "2"}]},
            },
            2,
        ),
        (
            {
                "status": "Failure",
                "reason": "InternalError",
                "message": 'OCI runtime exec failed: exec: "nc": executable file not found in $PATH: unknown',
            },
            EXIT_NOT_FOUND,
        ),
        ({"status": "Failure", "reason": "Forbidden", "message": "pods/exec is forbidden"}, 126),
    ],
)
def test_exec_status_channel(status: dict[str, object], code: int) -> None:
    assert exec_status(json.dumps(status))[0] == code


def test_exec_without_a_status_could_not_run() -> None:
    assert exec_status("")[0] == 126
