"""Certificate decisions and parsing as plain functions: should_renew, matching, judging, argv, settings."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

import pytest

from flows.certificates import render_markdown, table_rows
from tasks import certificates
from tasks.errors import SettingsError
from tasks.settings import CertEndpoint, CertificatesSettings, OpsSettings, load_settings
from tests.fixtures.acme import make_ca, make_leaf, write_pem

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def info(
    serial: str,
    days_left: float,
    sans: tuple[str, ...] = ("shop.example.com",),
    issued_days_ago: float = 10,
) -> certificates.CertificateInfo:
    return certificates.CertificateInfo(
        subject=f"CN={sans[0]}",
        sans=sans,
        issuer="Test CA",
        serial=serial,
        # As CAs issue them: both bounds count, a 90-day certificate ends 1 s before the 90th day.
        not_before=NOW - dt.timedelta(days=issued_days_ago) + dt.timedelta(seconds=1),
        not_after=NOW + dt.timedelta(days=days_left),
        sha256="00",
    )


def lineage(
    name: str, serial: str, days_left: float, issued_days_ago: float = 10
) -> certificates.WatchedCertificate:
    return certificates.WatchedCertificate(
        name,
        "lineage",
        Path(f"/le/live/{name}/cert.pem"),
        info(serial, days_left, issued_days_ago=issued_days_ago),
    )


def served(serial: str | None, days_left: float = 60, valid: bool = True) -> certificates.ServedCertificate:
    return certificates.ServedCertificate(
        endpoint="shop.example.com at 127.0.0.1:443",
        host="127.0.0.1",
        port=443,
        server_name="shop.example.com",
        info=info(serial, days_left) if serial else None,
        valid=valid,
        error=None if valid else "nothing listens",
    )


@pytest.mark.parametrize(
    ("days_left", "threshold", "force", "expected"),
    [
        (31, 30, False, False),
        (29.9, 30, False, True),
        (30, 30, False, False),
        (-1, 30, False, True),
        (80, 30, True, True),
        (89, 100, False, True),
    ],
)
def test_should_renew(days_left: float, threshold: int, force: bool, expected: bool) -> None:
    not_after = NOW + dt.timedelta(days=days_left)
    assert certificates.should_renew(not_after, NOW, threshold, force) is expected


def test_covers_exact_names_and_one_label_wildcards() -> None:
    cert = info("1", 60, sans=("shop.example.com", "*.api.example.com", "127.0.0.1"))
    assert cert.covers("SHOP.example.com.")
    assert cert.covers("v1.api.example.com")
    assert not cert.covers("a.v1.api.example.com")
    assert not cert.covers("api.example.com")
    assert cert.covers("127.0.0.1")
    assert not cert.covers("example.com")


def test_read_certificate_from_pem_and_fullchain(tmp_path: Path) -> None:
    ca = make_ca("Unit CA")
    leaf, _ = make_leaf(ca, ["shop.example.com", "10.0.0.1"])
    path = tmp_path / "fullchain.pem"
    path.write_bytes(
        write_pem(tmp_path / "leaf.pem", leaf).read_bytes()
        + write_pem(tmp_path / "ca.pem", ca[0]).read_bytes()
    )
    got = certificates.read_certificate(path)
    assert got.sans == ("shop.example.com", "10.0.0.1")
    assert got.issuer == "Unit CA"
    assert got.serial == format(leaf.serial_number, "x")
    assert 29 < got.days_left() <= 30

    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(certificates.CertificateFileError, match="no PEM certificate"):
        certificates.read_certificate(tmp_path / "junk.pem")
    with pytest.raises(certificates.CertificateFileError, match="cannot read certificate file"):
        certificates.read_certificate(tmp_path)


def test_inventory_with_nothing_configured_says_what_to_set(tmp_path: Path) -> None:
    cfg = CertificatesSettings(config_dir=tmp_path / "none")
    with pytest.raises(certificates.CertificateFileError, match="OPS_CERTIFICATES__CONFIG_DIR"):
        certificates.take_inventory(cfg)


def test_plan_renews_due_lineages_and_flags_due_files_certbot_cannot_renew() -> None:
    pem = certificates.WatchedCertificate(
        "/etc/ssl/other.pem", "pem", Path("/etc/ssl/other.pem"), info("9", 5)
    )
    inventory = certificates.Inventory(
        taken_at=NOW,
        certificates=(lineage("due", "1", 10), lineage("fresh", "2", 80), pem),
        endpoints=(),
        findings=(),
    )
    plan = certificates.plan_renewals(inventory, 30)
    assert plan.due == ("due",)
    assert plan.not_renewable == ("/etc/ssl/other.pem",)
    assert plan.needs_reload
    forced = certificates.plan_renewals(inventory, 30, force=True)
    assert forced.due == ("due", "fresh")


def test_threshold_beyond_the_lifetime_is_capped_and_reported() -> None:
    # 90-day certificates and a threshold of 100 days: uncapped, both would be due right after issue,
    # and every run would renew them again.
    fresh = lineage("fresh", "1", 89, issued_days_ago=1)
    older = lineage("older", "2", 59, issued_days_ago=31)
    assert fresh.info.lifetime_days == 90
    assert certificates.renewal_threshold(fresh.info, 100) == 60
    assert certificates.renewal_threshold(fresh.info, 30) == 30
    inventory = certificates.Inventory(taken_at=NOW, certificates=(fresh, older), endpoints=(), findings=())
    assert certificates.plan_renewals(inventory, 100).due == ("older",)
    assert certificates.plan_renewals(inventory, 100, force=True).due == ("fresh", "older")
    assert certificates.plan_renewals(inventory, 30).due == ()

    [capped] = certificates.certificate_findings(fresh, 100, NOW)
    assert capped.kind == "threshold-capped"
    assert "renew_threshold_days 100 would renew this 90-day certificate at every run" in capped.text
    assert "renewed with 60.0 days left" in capped.text
    assert "OPS_CERTIFICATES__RENEW_THRESHOLD_DAYS to 60 or less" in capped.text
    assert sorted(f.kind for f in certificates.certificate_findings(older, 100, NOW)) == [
        "due",
        "threshold-capped",
    ]
    assert certificates.certificate_findings(fresh, 30, NOW) == []

    # The renewed certificate is judged against what it must have not to be due again, not the
    # threshold an operator set to renew early.
    early = CertificatesSettings(renew_threshold_days=100)
    assert certificates.renewal_minimum_days(fresh.info, early) == 60
    assert certificates.judge_endpoint(served("1", 89), fresh, 60, NOW).ok
    explicit = CertificatesSettings(renew_threshold_days=100, min_days_after_renewal=95)
    assert certificates.renewal_minimum_days(fresh.info, explicit) == 95


def test_endpoint_serving_an_older_certificate_is_renewed_but_not_reloaded() -> None:
    endpoint = CertEndpoint(host="127.0.0.1", server_name="shop.example.com")
    state = certificates.EndpointState(endpoint, served("aa", days_left=20), lineage("shop", "bb", 89))
    assert state.stale
    [finding] = certificates.endpoint_findings(state)
    assert finding.kind == "not-reloaded"
    assert "serves serial aa" in finding.text
    assert "holds serial bb" in finding.text

    # A different certificate that is not older is not "not reloaded": the server points elsewhere.
    other = certificates.EndpointState(endpoint, served("cc", days_left=95), lineage("shop", "bb", 89))
    assert not other.stale
    assert [f.kind for f in certificates.endpoint_findings(other)] == ["unexpected-certificate"]

    same = certificates.EndpointState(endpoint, served("bb", days_left=89), lineage("shop", "bb", 89))
    assert certificates.endpoint_findings(same) == []
    down = certificates.EndpointState(endpoint, served(None, valid=False), lineage("shop", "bb", 89))
    assert [f.kind for f in certificates.endpoint_findings(down)] == ["unreachable"]


def test_expected_certificate_by_name_or_by_coverage() -> None:
    older, newer = lineage("old", "1", 10), lineage("new", "2", 80)
    by_name = CertEndpoint(host="h", server_name="shop.example.com", certificate="old")
    assert certificates.expected_certificate(by_name, [older, newer]) is older
    by_cover = CertEndpoint(host="h", server_name="shop.example.com")
    assert certificates.expected_certificate(by_cover, [older, newer]) is newer
    assert certificates.expected_certificate(CertEndpoint(host="elsewhere.org"), [older]) is None
    with pytest.raises(certificates.CertificateFileError, match="not watched"):
        certificates.expected_certificate(CertEndpoint(host="h", certificate="nope"), [older])


def test_judge_endpoint_names_what_is_served() -> None:
    expected = lineage("shop", "bb", 89)
    assert certificates.judge_endpoint(served("bb", 89), expected, 60, NOW).ok
    stale = certificates.judge_endpoint(served("aa", 20), expected, 60, NOW)
    assert not stale.ok
    assert "still serves serial aa" in (stale.problem or "")
    assert "serial bb" in (stale.problem or "")
    short = certificates.judge_endpoint(served("bb", 89), expected, 95, NOW)
    assert "only" in (short.problem or "")
    down = certificates.judge_endpoint(served(None, valid=False), expected, None, NOW)
    assert down.problem == "nothing listens"


def test_certbot_argv_has_server_dirs_and_no_random_sleep(tmp_path: Path) -> None:
    cfg = CertificatesSettings(
        certbot_path=Path("/opt/certbot/bin/certbot"),
        config_dir=tmp_path / "c",
        work_dir=tmp_path / "w",
        logs_dir=tmp_path / "l",
        acme_server="https://acme.example/dir",
    )
    dry = certificates.certbot_renew_argv(cfg, "shop", dry_run=True)
    assert dry[:4] == ["/opt/certbot/bin/certbot", "renew", "--cert-name", "shop"]
    for flag, value in [
        ("--server", "https://acme.example/dir"),
        ("--config-dir", str(tmp_path / "c")),
        ("--work-dir", str(tmp_path / "w")),
        ("--logs-dir", str(tmp_path / "l")),
    ]:
        assert dry[dry.index(flag) + 1] == value
    assert "--no-random-sleep-on-renew" in dry
    assert "--non-interactive" in dry
    assert dry[-1] == "--dry-run"
    real = certificates.certbot_renew_argv(cfg, "shop", dry_run=False)
    assert real[-1] == "--force-renewal"
    assert "--dry-run" not in real
    assert certificates.certbot_env(cfg) == {}
    with_bundle = cfg.model_copy(update={"acme_ca_bundle": Path("/ca.pem")})
    assert certificates.certbot_env(with_bundle) == {"REQUESTS_CA_BUNDLE": "/ca.pem"}


def test_each_lineage_renews_against_its_own_server_unless_forced(tmp_path: Path) -> None:
    renewal = tmp_path / "renewal"
    renewal.mkdir()
    (renewal / "zerossl.conf").write_text(
        "version = 5.8.0\ncert = /le/live/zerossl/cert.pem\n\n[renewalparams]\naccount = 1f\n"
        "server = https://acme.zerossl.com/v2/DV90\nauthenticator = standalone\n"
    )
    # certbot leaves `server` out of the renewal configuration when it used its default.
    (renewal / "plain.conf").write_text("[renewalparams]\naccount = 2e\nauthenticator = webroot\n")
    (renewal / "other-section.conf").write_text("server = https://top.example/dir\n[[webroot_map]]\n")
    cfg = CertificatesSettings(config_dir=tmp_path, acme_server="https://acme.example/dir")

    def server(name: str, config: CertificatesSettings = cfg) -> str:
        argv = certificates.certbot_renew_argv(config, name, dry_run=True)
        return argv[argv.index("--server") + 1]

    assert server("zerossl") == "https://acme.zerossl.com/v2/DV90"
    assert server("plain") == "https://acme.example/dir"
    assert server("other-section") == "https://acme.example/dir"
    forced = cfg.model_copy(update={"force_acme_server": True})
    assert server("zerossl", forced) == "https://acme.example/dir"


def test_readme_tells_the_two_ca_bundles_apart_with_an_example_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Certificate renewal", 1)[1].split("\n## ", 1)[0]
    examples = dict(re.findall(r"^\s*(OPS_CERTIFICATES__[A-Z_]+)=(\S+)$", section, flags=re.MULTILINE))
    assert {"OPS_CERTIFICATES__CA_BUNDLE", "OPS_CERTIFICATES__ACME_CA_BUNDLE"} <= set(examples)
    assert "REQUESTS_CA_BUNDLE" in section
    # The examples are real settings.
    for name, value in examples.items():
        monkeypatch.setenv(name, value)
    cfg = load_settings().certificates
    assert str(cfg.ca_bundle) == examples["OPS_CERTIFICATES__CA_BUNDLE"]
    assert str(cfg.acme_ca_bundle) == examples["OPS_CERTIFICATES__ACME_CA_BUNDLE"]


def test_default_certbot_is_the_one_beside_this_python() -> None:
    beside = Path(sys.executable).parent / "certbot"
    assert beside.is_file(), "the project's venv ships certbot"
    assert certificates.certbot_program(CertificatesSettings()) == str(beside)


def test_reload_commands_per_method() -> None:
    assert certificates.reload_commands(OpsSettings()) == [["nginx", "-s", "reload"]]
    custom = OpsSettings(
        certificates={"reload_argv": ["/usr/sbin/nginx", "-c", "/etc/x.conf", "-s", "reload"]}
    )
    assert certificates.reload_commands(custom) == [["/usr/sbin/nginx", "-c", "/etc/x.conf", "-s", "reload"]]
    assert certificates.reload_commands(OpsSettings(certificates={"reload_method": "kubernetes"})) == []
    assert certificates.reload_env(custom) == {}


def test_compose_reload_addresses_the_runtime_project() -> None:
    settings = OpsSettings(
        stack="shop",
        runtime={
            "compose": {
                "files": ["/srv/shop/compose.yml"],
                "docker_host": "unix:///run/shop-docker.sock",
            }
        },
        certificates={"reload_method": "compose", "reload_services": ["nginx", "edge"]},
    )
    base = ["docker", "compose", "--project-name", "shop", "--file", "/srv/shop/compose.yml", "exec", "-T"]
    assert certificates.reload_commands(settings) == [
        [*base, "nginx", "nginx", "-s", "reload"],
        [*base, "edge", "nginx", "-s", "reload"],
    ]
    assert certificates.reload_env(settings) == {"DOCKER_HOST": "unix:///run/shop-docker.sock"}


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "OPS_CERTIFICATES__ENDPOINTS", json.dumps([{"host": "10.0.0.5", "server_name": "shop.example.com"}])
    )
    monkeypatch.setenv("OPS_CERTIFICATES__RENEW_THRESHOLD_DAYS", "21")
    cfg = load_settings().certificates
    assert cfg.renew_threshold_days == 21
    [endpoint] = cfg.endpoints
    assert (endpoint.host, endpoint.port, endpoint.sni) == ("10.0.0.5", 443, "shop.example.com")
    assert endpoint.label == "shop.example.com at 10.0.0.5:443"

    monkeypatch.setenv("OPS_CERTIFICATES__ACME_SERVER", "http://acme.example/dir")
    with pytest.raises(SettingsError, match=r"certificates.acme_server.*https://"):
        load_settings()
    monkeypatch.delenv("OPS_CERTIFICATES__ACME_SERVER")
    monkeypatch.setenv("OPS_CERTIFICATES__LINEAGES", '["../etc"]')
    with pytest.raises(SettingsError, match="not a certbot certificate name"):
        load_settings()


def test_certbot_reason_picks_the_failure_line() -> None:
    output = (
        "Processing /le/renewal/shop.conf\n"
        "Failed to renew certificate shop with error: Connection refused\n"
        "All simulated renewals failed.\n"
        "Ask for help or search for solutions at https://community.letsencrypt.org. See the logfile\n"
    )
    assert (
        certificates.certbot_reason(output)
        == "Failed to renew certificate shop with error: Connection refused"
    )
    assert certificates.certbot_reason("") == "(no output)"


CERTBOT_LOG_TAIL = """\
2026-12-02 06:38:30,953:INFO:certbot._internal.auth_handler:Challenge failed for domain shop.example.com
2026-12-02 06:38:30,953:DEBUG:certbot._internal.display.obj:Notifying user: \n\
Certbot failed to authenticate some domains (authenticator: webroot). The Certificate Authority \
reported these problems:
  Identifier: shop.example.com
  Type:   unauthorized
  Detail: 203.0.113.7: Invalid response from http://shop.example.com/.well-known/acme-challenge/x: 404
{older}
Hint: The Certificate Authority failed to download the temporary challenge files created by Certbot.

2026-12-02 06:38:30,954:DEBUG:certbot._internal.error_handler:Encountered exception:
Traceback (most recent call last):
certbot.errors.AuthorizationError: Some challenges have failed.
"""


def test_challenge_problems_are_read_from_certbots_log(tmp_path: Path) -> None:
    older = "  Domain: www.example.com\n  Type:   dns\n  Detail: DNS problem: NXDOMAIN looking up A for www"
    text = CERTBOT_LOG_TAIL.format(older=older)
    assert certificates.challenge_problems(text) == (
        "shop.example.com: unauthorized: 203.0.113.7: Invalid response from"
        " http://shop.example.com/.well-known/acme-challenge/x: 404;"
        " www.example.com: dns: DNS problem: NXDOMAIN looking up A for www"
        " (hint: The Certificate Authority failed to download the temporary challenge files created"
        " by Certbot.)"
    )
    assert certificates.challenge_problems("2026-12-02 06:38:30,954:ERROR:certbot:Connection refused") is None

    # Only the log of the run that just ended counts: certbot starts a new letsencrypt.log per run.
    (tmp_path / "letsencrypt.log").write_text(text)
    assert certificates.certbot_log_cause(tmp_path, since=0) is not None
    assert certificates.certbot_log_cause(tmp_path, since=time.time() + 60) is None
    assert certificates.certbot_log_cause(tmp_path / "missing", since=0) is None


def test_report_shows_every_certificate_and_endpoint_with_problems() -> None:
    summary = certificates.RunSummary(stack="s", force=False, dry_run=False)
    endpoint = CertEndpoint(host="127.0.0.1", server_name="shop.example.com")
    summary.inventory = certificates.Inventory(
        taken_at=NOW,
        certificates=(lineage("shop", "bb", 10),),
        endpoints=(certificates.EndpointState(endpoint, served("bb", 10), lineage("shop", "bb", 10)),),
        findings=(certificates.Finding("due", "shop", "10.0 days left"),),
    )
    summary.plan = certificates.plan_renewals(summary.inventory, 30)
    summary.dry_runs.append(
        certificates.DryRunResult(
            "shop", False, "certbot renew --dry-run", "Failed to renew certificate shop", 1.0
        )
    )
    rows = table_rows(summary)
    assert [(r["kind"], r["status"]) for r in rows] == [("lineage", "due, not renewed"), ("endpoint", "ok")]
    assert rows[0]["days_left"] == 10.0
    markdown = render_markdown(summary)
    assert "**failed**" in markdown
    assert "dry run of shop failed, so it was not renewed" in markdown
    assert summary.unrenewed_due() == ["shop"]


def test_endpoint_no_watched_certificate_covers_is_flagged_near_expiry() -> None:
    endpoint = CertEndpoint(host="127.0.0.1", server_name="shop.example.com")
    near = certificates.EndpointState(endpoint, served("aa", days_left=10), None)
    [finding] = certificates.endpoint_findings(near, 30)
    assert finding.kind == "uncovered"
    assert "no watched certificate covers shop.example.com" in finding.text
    far = certificates.EndpointState(endpoint, served("aa", days_left=60), None)
    assert certificates.endpoint_findings(far, 30) == []

    verdict = certificates.judge_endpoint(served("aa", 10), None, 30)
    assert not verdict.ok
    assert "no watched certificate covers" in (verdict.problem or "")


def test_certificates_expiring_within_seven_days_without_a_renewal_are_named() -> None:
    soon = lineage("shop", "01", days_left=5)
    renewed = lineage("api", "02", days_left=3)
    fine = lineage("docs", "03", days_left=40)
    endpoint = certificates.EndpointState(
        CertEndpoint(host="127.0.0.1", port=443, server_name="shop.example.com"), served("09", 2), None
    )
    summary = certificates.RunSummary(stack="s", force=False, dry_run=False)
    summary.inventory = certificates.Inventory(NOW, (soon, renewed, fine), (endpoint,), ())
    summary.renewals = [
        certificates.RenewalRecord("api", True, "02", "12", NOW, NOW + dt.timedelta(days=90), "certbot renew")
    ]
    assert summary.expiring(7, now=NOW) == [
        ("certificate shop", 5.0),
        ("endpoint shop.example.com at 127.0.0.1:443", 2.0),
    ]
    assert summary.expiring(1, now=NOW) == []
