"""Diagnose's response times (runbook 5 "Check response times"): each phase of real requests to real
HTTP and HTTPS servers on 127.0.0.1, one of which waits before its first byte or its TLS handshake,
so that the slow phase is the one the report names."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks import diagnose as d
from tasks.diagnose import Severity
from tasks.settings import DiagnoseSettings, HealthSettings, OpsSettings, RuntimeSettings
from tests.fixtures.diag_services import DIAG_CLOSED_PORT


@dataclass
class Delays:
    first_byte: float = 0.0
    handshake: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client must stop at Content-Length, not at EOF

    def do_GET(self) -> None:
        delays: Delays = self.server.delays  # type: ignore[attr-defined]
        time.sleep(delays.first_byte)
        body = b'{"status":"ok"}' * 100
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delays: Delays, context: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delays = delays
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the connection's own thread, after the configured wait: a slow TLS
        # handshake without a slow accept.
        if self.context is not None:
            time.sleep(self.delays.handshake)
            request = self.context.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client refusing the certificate is what one test wants: no traceback on stderr


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key (the certificate is its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class Servers:
    """HTTP(S) servers on 127.0.0.1 for one test, all shut down afterwards."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[tuple[_Server, threading.Thread]] = []
        self.cert: Path | None = None

    def start(self, delays: Delays, tls: bool = False) -> int:
        context = None
        if tls:
            if self.cert is None:
                self.cert, self.key = _self_signed(self.directory)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert, self.key)
        server = _Server(delays, context)
        thread = threading.Thread(target=server.serve_forever, name="timed-endpoint", daemon=True)
        thread.start()
        self.started.append((server, thread))
        return int(server.server_address[1])

    def stop(self) -> None:
        for server, thread in self.started:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def _settings(urls: list[str], smoke: list[str] | None = None, **limits: Any) -> OpsSettings:
    return OpsSettings(
        health=HealthSettings(urls=urls),
        runtime=RuntimeSettings(smoke_urls=smoke or []),
        diagnose=DiagnoseSettings(**limits),
    )


def _endpoint(diagnosis: d.Diagnosis, url_part: str) -> d.EndpointTiming:
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.ResponseTimesEvidence)
    return next(e for e in evidence.endpoints if url_part in e.url)


def test_a_slow_first_byte_is_flagged_and_attributed_to_the_server(servers: Servers) -> None:
    slow = servers.start(Delays(first_byte=1.2))
    fast = servers.start(Delays())
    settings = _settings(
        [f"http://127.0.0.1:{slow}/api/health"], [f"http://127.0.0.1:{fast}/api/specs"], http_samples=3
    )
    diagnosis = d.run_diagnostic("response-times", settings)
    assert diagnosis.error is None

    slow_timing = _endpoint(diagnosis, str(slow))
    assert len(slow_timing.samples) == 3
    assert all(s.error is None and s.status == 200 for s in slow_timing.samples)
    assert slow_timing.median("first_byte") >= 1200  # type: ignore[operator]
    assert slow_timing.median("connect") < 200  # type: ignore[operator]
    assert slow_timing.median("tls") is None  # plain HTTP: no handshake
    assert slow_timing.median("total") >= 1200  # type: ignore[operator]
    assert slow_timing.worst("total") >= slow_timing.median("total")  # type: ignore[operator]
    assert slow_timing.dominant == "first_byte"

    fast_timing = _endpoint(diagnosis, str(fast))
    assert fast_timing.median("total") < 500  # type: ignore[operator]

    flagged = [f for f in diagnosis.findings if f.severity is Severity.WARNING]
    assert len(flagged) == 1
    finding = flagged[0]
    assert f"127.0.0.1:{slow}" in finding.summary
    assert "1000 ms" in finding.summary
    assert "first byte" in finding.summary
    assert finding.runbook == d.RB_SLOW
    assert finding.resolution is not None
    assert "bottleneck" in finding.resolution

    rows = diagnosis.rows()
    assert {r["stat"] for r in rows} == {"median", "worst"}
    slow_median = next(r for r in rows if str(slow) in r["endpoint"] and r["stat"] == "median")
    assert slow_median["dominant"] == "first byte"
    assert slow_median["samples"] == "3/3"


def test_tls_phases_are_measured_and_a_slow_handshake_is_named(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    handshake = servers.start(Delays(handshake=1.1), tls=True)
    answer = servers.start(Delays(first_byte=1.1), tls=True)
    assert servers.cert is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(servers.cert))  # the default trust store, as curl and httpx
    settings = _settings(
        [f"https://localhost:{handshake}/health", f"https://localhost:{answer}/health"], http_samples=2
    )
    diagnosis = d.run_diagnostic("response-times", settings)

    slow_tls = _endpoint(diagnosis, str(handshake))
    assert all(s.error is None and s.status == 200 for s in slow_tls.samples), slow_tls.samples
    assert slow_tls.median("dns") is not None  # localhost went through the resolver
    assert slow_tls.median("tls") >= 1100  # type: ignore[operator]
    assert slow_tls.median("connect") < 200  # type: ignore[operator]
    assert slow_tls.median("first_byte") < 500  # type: ignore[operator]
    assert slow_tls.dominant == "tls"

    slow_answer = _endpoint(diagnosis, str(answer))
    assert slow_answer.median("tls") < 500  # type: ignore[operator]
    assert slow_answer.dominant == "first_byte"

    summaries = {f.summary for f in diagnosis.findings if f.severity is Severity.WARNING}
    assert any(str(handshake) in s and "TLS handshake" in s for s in summaries), summaries
    assert any(str(answer) in s and "first byte" in s for s in summaries), summaries


def test_an_untrusted_certificate_fails_in_the_tls_phase(servers: Servers) -> None:
    port = servers.start(Delays(), tls=True)
    diagnosis = d.response_times(_settings([f"https://localhost:{port}/health"], http_samples=2))
    timing = _endpoint(diagnosis, str(port))
    assert timing.samples
    assert all(s.failed_phase == "tls" for s in timing.samples)
    assert "CERTIFICATE_VERIFY_FAILED" in (timing.samples[0].error or "")
    finding = diagnosis.findings[0]
    assert finding.severity is Severity.WARNING
    assert "TLS" in finding.summary


def test_a_refused_endpoint_fails_in_the_connect_phase() -> None:
    with socket.socket() as probe:  # the closed port of the diagnose fixtures really is closed
        assert probe.connect_ex(("127.0.0.1", DIAG_CLOSED_PORT)) != 0
    diagnosis = d.response_times(_settings([f"http://127.0.0.1:{DIAG_CLOSED_PORT}/health"], http_samples=2))
    timing = _endpoint(diagnosis, str(DIAG_CLOSED_PORT))
    assert [s.failed_phase for s in timing.samples] == ["connect", "connect"]
    assert timing.median("total") is None
    finding = diagnosis.findings[0]
    assert finding.severity is Severity.WARNING
    assert "connect" in finding.summary
    assert finding.flow == d.FLOW_RESTART


def test_no_endpoint_configured_is_said() -> None:
    diagnosis = d.response_times(OpsSettings())
    assert [f.severity for f in diagnosis.findings] == [Severity.INFO]
    assert "health.urls" in diagnosis.findings[0].summary
