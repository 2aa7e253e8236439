"""Certificate functions against real components: pebble (ACME, real http-01), certbot and nginx."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import certificates
from tasks.settings import CertEndpoint, OpsSettings
from tests.fixtures.acme import (
    DEAD_PORT,
    HTTP01_PORT,
    OTHER_HTTP01_PORT,
    Lineage,
    Nginx,
    certificate_settings,
    copy_lineage,
    http_404_server,
)

pytestmark = pytest.mark.integration


def served(nginx: Nginx, lineage: Lineage, name: str | None = None) -> certificates.CertificateInfo:
    return certificates.fetch_served_certificate(
        "127.0.0.1", nginx.port, name or nginx.server_name, ca_bundle=lineage.pebble.root_ca, timeout=3
    )


def test_reads_the_lineage_issued_by_pebble(acme_lineage: Lineage) -> None:
    cert = certificates.read_lineage(acme_lineage.config_dir, acme_lineage.cert_name)
    assert cert.kind == "lineage"
    assert cert.info.sans == (acme_lineage.domain,)
    assert "Pebble Intermediate" in cert.info.issuer
    # pebble is configured for 90-day certificates, like Let's Encrypt.
    assert 89 < cert.info.days_left() <= 90


def test_served_certificate_is_validated_against_the_ca_bundle(
    acme_lineage: Lineage, lineage_nginx: Nginx
) -> None:
    on_disk = certificates.read_certificate(acme_lineage.live / "cert.pem")
    info = served(lineage_nginx, acme_lineage)
    assert info.serial == on_disk.serial

    # Wrong name: the handshake still reads the certificate, but hostname validation rejects it.
    with pytest.raises(certificates.ServedCertificateInvalid, match="Hostname mismatch") as caught:
        served(lineage_nginx, acme_lineage, name="other.ops.test")
    assert caught.value.certificate is not None
    assert caught.value.certificate.serial == on_disk.serial

    # A CA bundle that did not sign it (the ACME API's listener CA): untrusted.
    with pytest.raises(certificates.ServedCertificateInvalid, match="unable to get local issuer"):
        certificates.fetch_served_certificate(
            "127.0.0.1",
            lineage_nginx.port,
            acme_lineage.domain,
            ca_bundle=acme_lineage.pebble.listener_ca,
            timeout=3,
        )


def test_unreachable_endpoint_and_bad_paths_give_clear_errors(acme_lineage: Lineage, tmp_path: Path) -> None:
    with pytest.raises(certificates.EndpointUnreachable, match=rf"nothing listens on 127.0.0.1:{DEAD_PORT}"):
        certificates.fetch_served_certificate(
            "127.0.0.1", DEAD_PORT, acme_lineage.domain, ca_bundle=acme_lineage.pebble.root_ca, timeout=2
        )
    with pytest.raises(certificates.CertificateFileError, match="does not exist"):
        certificates.read_certificate(tmp_path / "missing.pem")
    with pytest.raises(certificates.CertificateFileError, match="no PEM certificate"):
        certificates.read_certificate(acme_lineage.live / "privkey.pem")
    with pytest.raises(certificates.CertificateFileError, match=r"no lineage 'nope'.*known lineages: shop"):
        certificates.read_lineage(acme_lineage.config_dir, "nope")

    cfg = certificate_settings(
        acme_lineage,
        None,
        endpoints=[CertEndpoint(host="127.0.0.1", port=DEAD_PORT, server_name=acme_lineage.domain)],
    )
    inventory = certificates.take_inventory(cfg)
    [finding] = inventory.findings
    assert finding.kind == "unreachable"
    assert f"127.0.0.1:{DEAD_PORT}" in finding.subject
    assert "connection refused" in finding.text


def test_failing_dry_run_changes_nothing(acme_lineage: Lineage, lineage_nginx: Nginx) -> None:
    before = certificates.read_lineage(acme_lineage.config_dir, acme_lineage.cert_name).info
    cfg = certificate_settings(
        acme_lineage,
        lineage_nginx,
        acme_server=f"https://127.0.0.1:{DEAD_PORT}/dir",
        force_acme_server=True,
    )
    result = certificates.certbot_dry_run(cfg, acme_lineage.cert_name)
    assert not result.passed
    assert "Connection refused" in certificates.certbot_reason(result.output_tail)
    assert (
        certificates.read_lineage(acme_lineage.config_dir, acme_lineage.cert_name).info.serial
        == before.serial
    )
    assert served(lineage_nginx, acme_lineage).serial == before.serial


def test_each_lineage_renews_against_the_server_that_issued_it(acme_lineage: Lineage) -> None:
    # The configured ACME server is another CA (here: one that is down); the lineage was issued by
    # pebble and its renewal configuration says so: it renews there, unless the operator forces
    # every lineage onto the configured server.
    other_ca = f"https://127.0.0.1:{DEAD_PORT}/dir"
    conf = acme_lineage.config_dir / "renewal" / f"{acme_lineage.cert_name}.conf"
    assert f"server = {acme_lineage.pebble.directory_url}" in conf.read_text()
    cfg = certificate_settings(acme_lineage, None, acme_server=other_ca)
    assert certificates.lineage_server(cfg, acme_lineage.cert_name) == acme_lineage.pebble.directory_url

    dry = certificates.certbot_dry_run(cfg, acme_lineage.cert_name)
    assert dry.passed, dry.output_tail
    assert f"--server {acme_lineage.pebble.directory_url}" in dry.command
    record = certificates.renew_lineage(cfg, acme_lineage.cert_name)
    assert record.new_serial != record.old_serial
    assert f"--server {acme_lineage.pebble.directory_url}" in record.command
    assert f"server = {acme_lineage.pebble.directory_url}" in conf.read_text()

    forced = certificates.certbot_dry_run(cfg.model_copy(update={"force_acme_server": True}), "shop")
    assert not forced.passed
    assert f"--server {other_ca}" in forced.command
    assert "Connection refused" in certificates.certbot_reason(forced.output_tail)


def test_failed_challenge_names_the_cause_from_certbots_log(acme_lineage: Lineage, tmp_path: Path) -> None:
    # certbot answers the http-01 challenge on another port than the one the CA fetches it from.
    broken = copy_lineage(acme_lineage, tmp_path, http01_port=str(OTHER_HTTP01_PORT))
    cfg = certificate_settings(broken, None)
    before = certificates.read_lineage(broken.config_dir, broken.cert_name).info.serial

    # Nothing listens where the CA fetches the token.
    dry = certificates.certbot_dry_run(cfg, broken.cert_name)
    assert not dry.passed
    assert "Some challenges have failed" in certificates.certbot_reason(dry.output_tail)
    assert dry.cause is not None
    assert f"{broken.domain}: connection:" in dry.cause
    assert f"127.0.0.1:{HTTP01_PORT}: connect: connection refused" in dry.cause
    assert "connection refused" in dry.reason

    # Another web server answers there, without the token.
    with http_404_server(HTTP01_PORT), pytest.raises(certificates.RenewalFailed) as caught:
        certificates.renew_lineage(cfg, broken.cert_name)
    message = str(caught.value)
    assert f"{broken.domain}: unauthorized:" in message
    assert "/.well-known/acme-challenge/" in message
    assert "404" in message
    assert certificates.read_lineage(broken.config_dir, broken.cert_name).info.serial == before


def test_renewal_without_reload_is_found_and_reload_fixes_it(
    acme_lineage: Lineage, lineage_nginx: Nginx
) -> None:
    cfg = certificate_settings(acme_lineage, lineage_nginx)
    old = served(lineage_nginx, acme_lineage)

    dry = certificates.certbot_dry_run(cfg, acme_lineage.cert_name)
    assert dry.passed, dry.output_tail
    assert "--no-random-sleep-on-renew" in dry.command
    record = certificates.renew_lineage(cfg, acme_lineage.cert_name)
    assert record.changed
    assert record.old_serial == old.serial
    assert record.new_serial != old.serial

    # certbot replaced the files; nginx still holds the old certificate in memory.
    inventory = certificates.take_inventory(cfg)
    [finding] = [f for f in inventory.findings if f.kind == "not-reloaded"]
    assert "renewed but not reloaded" in finding.text
    assert old.serial in finding.text
    assert record.new_serial in finding.text
    assert certificates.plan_renewals(inventory, cfg.renew_threshold_days).stale_endpoints == (
        finding.subject,
    )
    [verdict] = certificates.verify_endpoints(cfg, [acme_lineage.cert_name], wait_seconds=0)
    assert not verdict.ok
    assert f"still serves serial {old.serial}" in (verdict.problem or "")

    reload = certificates.reload_server(OpsSettings(certificates=cfg))
    assert reload.commands == (" ".join(lineage_nginx.reload_argv),)
    [verdict] = certificates.verify_endpoints(cfg, [acme_lineage.cert_name], wait_seconds=10)
    assert verdict.ok, verdict.problem
    assert verdict.served.info is not None
    assert verdict.served.info.serial == record.new_serial
    assert served(lineage_nginx, acme_lineage).serial == record.new_serial


def test_reload_failure_is_a_clear_error(acme_lineage: Lineage, lineage_nginx: Nginx, tmp_path: Path) -> None:
    cfg = certificate_settings(
        acme_lineage,
        lineage_nginx,
        reload_argv=["nginx", "-c", str(tmp_path / "missing.conf"), "-s", "reload"],
    )
    with pytest.raises(certificates.ReloadFailed, match="not served yet"):
        certificates.reload_server(OpsSettings(certificates=cfg))
