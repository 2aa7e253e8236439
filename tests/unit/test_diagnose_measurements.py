"""Diagnose's measurements, pure parts: findings from timed samples, nginx sizes and `nginx -T` dumps."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("10k", 10 * 2**10),
        ("10K", 10 * 2**10),
        ("1m", 2**20),
        ("50M", 50 * 2**20),
        ("1g", 2**30),
    ],
)
def test_nginx_sizes(text: str, size: int) -> None:
    assert d.parse_nginx_size(text) == size


def test_nginx_size_zero_is_unlimited_and_nonsense_is_refused() -> None:
    assert d.parse_nginx_size("0") is None
    assert d.parse_nginx_size("0m") is None
    for bad in ("1.5m", "10 MB", "ten", ""):
        with pytest.raises(ValueError, match="not an nginx size"):
            d.parse_nginx_size(bad)


DUMP = """\
# configuration file /etc/nginx/nginx.conf:
events {}
http {
    # client_max_body_size 99m;   a comment, not a directive
    log_format main '$remote_addr "{quoted braces}" ; ${host}';
    include /etc/nginx/sites-enabled/*;
}

# configuration file /etc/nginx/sites-enabled/api:
server {
    server_name *.example.com;
    location ~ "^/api/v[0-9]{1,2}/upload" {
        client_max_body_size 0;
        location /api/v1/upload/big { client_max_body_size 2g; }
    }
    location /static { }
}
server {
    server_name ~^admin\\d+\\.example\\.org$;
    client_max_body_size 5m;
}
"""


def test_nginx_dump_limits_per_server_and_location() -> None:
    limits, skipped = d.nginx_body_limits(DUMP, [])
    assert skipped == []
    shown = [(lim.where, lim.limit, lim.limit_bytes, lim.source) for lim in limits]
    assert shown == [
        ("server *.example.com", "1m", 2**20, "nginx default"),
        (
            "server *.example.com, location ~ ^/api/v[0-9]{1,2}/upload",
            "0",
            None,
            "/etc/nginx/sites-enabled/api:4",
        ),
        (
            "server *.example.com, location ~ ^/api/v[0-9]{1,2}/upload, location /api/v1/upload/big",
            "2g",
            2 * 2**30,
            "/etc/nginx/sites-enabled/api:5",
        ),
        ("server ~^admin\\d+\\.example\\.org$", "5m", 5 * 2**20, "/etc/nginx/sites-enabled/api:11"),
    ]


def test_nginx_server_names_select_the_apps_servers() -> None:
    limits, skipped = d.nginx_body_limits(DUMP, ["api.example.com"])
    assert {lim.where.split(",")[0] for lim in limits} == {"server *.example.com"}
    assert skipped == ["~^admin\\d+\\.example\\.org$"]
    regex, _ = d.nginx_body_limits(DUMP, ["admin7.example.org"])
    assert [lim.limit for lim in regex] == ["5m"]


def test_output_that_is_no_nginx_dump_is_refused() -> None:
    with pytest.raises(ValueError, match="nginx -T"):
        d.nginx_body_limits("nginx: configuration file /etc/nginx/nginx.conf test is successful\n", [])
