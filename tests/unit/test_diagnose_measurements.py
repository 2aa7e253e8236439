"""Diagnose's measurements, pure parts: findings from timed samples."""

from __future__ import annotations

from tasks import diagnose as d
from tasks.diagnose import Severity


def _sample(first_byte: float, dns: float = 1.0, connect: float = 1.0) -> d.TimingSample:
    return d.TimingSample(dns, connect, None, first_byte, 1.0, dns + connect + first_byte + 1.0, 200)


def test_only_the_worst_over_the_limit_is_intermittent_not_slow() -> None:
    samples = (_sample(50), _sample(60), _sample(1500), _sample(55), _sample(70))
    evidence = d.ResponseTimesEvidence((d.EndpointTiming("http://api/health", samples, 5),))
    endpoint = evidence.endpoints[0]
    assert endpoint.median("first_byte") == 60
    assert endpoint.worst("first_byte") == 1500
    findings = d.response_time_findings(evidence, 1000)
    assert [f.severity for f in findings] == [Severity.INFO]
    assert "sometimes slow" in findings[0].summary
    assert "worst 1503 ms" in findings[0].summary


def test_a_slow_lookup_points_at_dns() -> None:
    samples = (_sample(10, dns=1400), _sample(10, dns=1300), _sample(10, dns=1200))
    evidence = d.ResponseTimesEvidence((d.EndpointTiming("http://api/health", samples, 3),))
    assert evidence.endpoints[0].dominant == "dns"
    finding = d.response_time_findings(evidence, 1000)[0]
    assert finding.severity is Severity.WARNING
    assert "DNS lookup dominates" in finding.summary
    assert finding.runbook == d.RB_NETWORK
