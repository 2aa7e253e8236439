"""Diagnose's upload limits (runbook 6 "Check nginx/reverse proxy limits (client_max_body_size)"): a real
nginx whose configuration is read through ``nginx -T`` (and which really refuses a larger body), the
Kubernetes emulator's Ingresses with and without the proxy-body-size annotation, and the backend's
configured limit, each against the expected upload size."""

from __future__ import annotations

import contextlib
import http.client
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tasks import diagnose as d
from tasks.diagnose import Severity
from tasks.settings import DiagnoseSettings, OpsSettings, RuntimeSettings

NGINX_MAIN = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
events {{ worker_connections 32; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    client_max_body_size 20m;  # every server inherits this unless it says otherwise
    include conf.d/*.conf;
}}
"""

NGINX_APP = """\
# the app's server: 1m for everything but its upload location
server {{
    listen 127.0.0.1:{port};
    server_name api.example.test "www.example.test";
    client_max_body_size 1m;
    location /api/upload {{
        client_max_body_size 100m;
        return 200 "stored\\n";
    }}
    location / {{ return 200 "ok\\n"; }}
}}
"""

NGINX_OTHER = """\
server {{
    listen 127.0.0.1:{port};
    server_name docs.example.test;
    location / {{ return 200 "docs\\n"; }}
}}
"""


@dataclass
class RunningNginx:
    port: int
    prefix: Path
    conf: Path
    proc: subprocess.Popen[bytes]

    @property
    def dump_argv(self) -> list[str]:
        """``nginx -T`` against this instance's configuration."""
        program = shutil.which("nginx") or "/usr/sbin/nginx"
        return [
            program,
            "-T",
            "-c",
            str(self.conf),
            "-p",
            f"{self.prefix}/",
            "-e",
            str(self.prefix / "e.log"),
        ]

    def post(self, path: str, size: int) -> int:
        """The status of a POST of ``size`` bytes (nginx judges the announced Content-Length)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.putrequest("POST", path, skip_host=True)
            connection.putheader("Host", "api.example.test")
            connection.putheader("Content-Length", str(size))
            connection.endheaders()
            # nginx answers 413 and may close before reading the body.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.send(b"x" * size)
            return connection.getresponse().status
        finally:
            connection.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[RunningNginx]:
    """A real nginx with the app's server (1m, 100m for /api/upload) and another server (inherits 20m)."""
    program = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if program is None:
        pytest.fail("nginx is not installed; run scripts/setup.sh --dev --system")
    prefix = tmp_path / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    (prefix / "conf.d").mkdir()
    port = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(prefix=prefix))
    (prefix / "conf.d" / "app.conf").write_text(NGINX_APP.format(port=port))
    (prefix / "conf.d" / "other.conf").write_text(NGINX_OTHER.format(port=port))
    proc = subprocess.Popen(
        [program, "-c", str(conf), "-p", f"{prefix}/", "-e", str(prefix / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
                pytest.fail(f"nginx did not start on 127.0.0.1:{port}: {log[-2000:]}")
            time.sleep(0.05)
        yield RunningNginx(port, prefix, conf, proc)
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful stop of this master (and its worker), by PID
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _nginx_settings(nginx: RunningNginx, **limits: Any) -> OpsSettings:
    return OpsSettings(diagnose=DiagnoseSettings(nginx_config_argv=nginx.dump_argv, **limits))


def test_nginx_limit_below_the_expected_size_names_the_runbooks_resolution(nginx: RunningNginx) -> None:
    # The real nginx enforces what the report will say: 1m on the app's server, 100m for uploads.
    assert nginx.post("/", 2 * 2**20) == 413
    assert nginx.post("/api/upload", 2 * 2**20) == 200

    settings = _nginx_settings(nginx, nginx_server_names=["api.example.test"], expected_upload_mb=10)
    diagnosis = d.run_diagnostic("upload-limits", settings)
    assert diagnosis.error is None
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.UploadLimitsEvidence)
    limits = {(lim.where, lim.limit_bytes) for lim in evidence.limits}
    assert limits == {
        ("server api.example.test www.example.test", 2**20),
        ("server api.example.test www.example.test, location /api/upload", 100 * 2**20),
    }
    sources = {lim.source for lim in evidence.limits}
    assert sources == {f"{nginx.prefix}/conf.d/app.conf:5", f"{nginx.prefix}/conf.d/app.conf:7"}

    warnings = [f for f in diagnosis.findings if f.severity is Severity.WARNING]
    assert len(warnings) == 1
    finding = warnings[0]
    assert "api.example.test" in finding.summary
    assert "1m" in finding.summary
    assert "10 MiB" in finding.summary
    assert finding.runbook == d.RB_UPLOADS
    assert finding.resolution is not None
    assert "client_max_body_size 50M;" in finding.resolution

    rows = diagnosis.rows()
    assert {r["layer"] for r in rows} == {"nginx"}
    assert any(r["limit"] == "1m" and r["below_expected"] for r in rows)


def test_every_nginx_server_is_reported_without_a_server_name(nginx: RunningNginx) -> None:
    diagnosis = d.upload_limits(_nginx_settings(nginx, expected_upload_mb=10))
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.UploadLimitsEvidence)
    by_where = {lim.where: lim for lim in evidence.limits}
    other = by_where["server docs.example.test"]
    assert other.limit_bytes == 20 * 2**20  # inherited from http
    assert other.source == f"{nginx.prefix}/nginx.conf:12"
    assert len([f for f in diagnosis.findings if f.severity is Severity.WARNING]) == 1

    # Expected uploads of 500 MiB: even the upload location (100m) and the docs server are too low.
    strict = d.upload_limits(_nginx_settings(nginx, expected_upload_mb=500))
    assert len([f for f in strict.findings if f.severity is Severity.WARNING]) == 3
    assert any("client_max_body_size 500M;" in (f.resolution or "") for f in strict.findings)


def test_a_server_name_nginx_does_not_serve_is_a_finding(nginx: RunningNginx) -> None:
    diagnosis = d.upload_limits(_nginx_settings(nginx, nginx_server_names=["shop.example.test"]))
    finding = diagnosis.findings[0]
    assert finding.severity is Severity.WARNING
    assert "shop.example.test" in finding.summary
    assert "nginx_server_names" in (finding.resolution or "")


def test_a_broken_or_unreachable_nginx_configuration_is_a_finding(nginx: RunningNginx) -> None:
    (nginx.prefix / "conf.d" / "broken.conf").write_text("server { client_max_body_size ten; }\n")
    broken = d.upload_limits(_nginx_settings(nginx))
    assert broken.findings[0].severity is Severity.WARNING
    assert "nginx configuration could not be read" in broken.findings[0].summary
    assert "client_max_body_size" in broken.findings[0].summary  # nginx's own [emerg] line

    missing = d.upload_limits(
        OpsSettings(diagnose=DiagnoseSettings(nginx_config_argv=["/nonexistent/nginx", "-T"]))
    )
    assert missing.findings[0].severity is Severity.WARNING
    assert "not found" in missing.findings[0].summary
    assert "nginx_config_argv" in (missing.findings[0].resolution or "")


def test_backend_limit_and_nothing_configured() -> None:
    low = d.upload_limits(OpsSettings(diagnose=DiagnoseSettings(backend_upload_limit_mb=5)))
    assert [f.severity for f in low.findings] == [Severity.WARNING]
    assert "Multer" in (low.findings[0].resolution or "")
    high = d.upload_limits(OpsSettings(diagnose=DiagnoseSettings(backend_upload_limit_mb=20)))
    assert [f.severity for f in high.findings] == [Severity.OK]
    nothing = d.upload_limits(OpsSettings())
    assert [f.severity for f in nothing.findings] == [Severity.INFO]
    assert "nginx_config_argv" in nothing.findings[0].summary


INGRESS_ANNOTATION = "nginx.ingress.kubernetes.io/proxy-body-size"


def _ingress(
    name: str, namespace: str, annotations: dict[str, str], ingress_class: str | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "rules": [
            {
                "host": f"{name}.example.test",
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": "backend", "port": {"number": 3000}}},
                        }
                    ]
                },
            }
        ]
    }
    if ingress_class is not None:
        spec["ingressClassName"] = ingress_class
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": spec,
    }


def test_kubernetes_ingress_annotations_against_the_expected_size(kube_emulator: Any) -> None:
    from kubernetes import client

    kube_emulator.emulator.resources["networking.k8s.io/v1/ingresses"] = {}
    api_client = kube_emulator.api()
    networking = client.NetworkingV1Api(api_client)
    ns = kube_emulator.namespace
    created = [
        _ingress("app", ns, {INGRESS_ANNOTATION: "1m"}, "nginx"),
        _ingress("uploads", ns, {INGRESS_ANNOTATION: "0"}, "nginx"),  # 0: unlimited
        _ingress("plain", ns, {}, None),  # no annotation: the controller's default
        _ingress("edge", ns, {}, "traefik"),  # not an nginx Ingress: no such limit
    ]
    for body in created:
        networking.create_namespaced_ingress(ns, body)
    try:
        settings = OpsSettings(
            runtime=RuntimeSettings(
                kind="kubernetes", kubernetes={"api_url": kube_emulator.url, "namespace": ns}
            ),
            diagnose=DiagnoseSettings(expected_upload_mb=10, ingress_default_body_size="2m"),
        )
        diagnosis = d.run_diagnostic("upload-limits", settings)
        assert diagnosis.error is None
        evidence = diagnosis.evidence
        assert isinstance(evidence, d.UploadLimitsEvidence)
        by_where = {lim.where: lim for lim in evidence.limits}
        assert by_where["ingress app (app.example.test)"].limit_bytes == 2**20
        assert by_where["ingress uploads (uploads.example.test)"].limit_bytes is None
        assert by_where["ingress plain (plain.example.test)"].limit_bytes == 2 * 2**20
        assert "default" in by_where["ingress plain (plain.example.test)"].source
        assert "ingress edge (edge.example.test)" not in by_where

        warnings = sorted(f.summary for f in diagnosis.findings if f.severity is Severity.WARNING)
        assert len(warnings) == 2
        assert "ingress app" in warnings[0]
        assert "ingress plain" in warnings[1]
        resolutions = {f.resolution for f in diagnosis.findings if f.severity is Severity.WARNING}
        assert all(INGRESS_ANNOTATION in (r or "") for r in resolutions)
        assert any("edge" in n for n in evidence.notes)
    finally:
        for body in created:
            networking.delete_namespaced_ingress(body["metadata"]["name"], ns)
        api_client.close()
