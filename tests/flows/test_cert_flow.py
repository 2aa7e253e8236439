"""The renew-certificates flow under the Prefect harness, against pebble, certbot and a real nginx."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.states import State

from flows.certificates import renew_certificates
from tasks import certificates
from tests.fixtures.acme import (
    DEAD_PORT,
    HTTP01_PORT,
    OTHER_HTTP01_PORT,
    Lineage,
    Nginx,
    certificate_env,
    certificate_settings,
    copy_lineage,
    make_ca,
    make_leaf,
    write_pem,
)

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.flow, pytest.mark.integration]

# pebble issues 90-day certificates, like Let's Encrypt: a fresh one is never due (not even with a
# threshold above its lifetime), so the tests that need a renewal force it.


def set_env(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def artifacts(state: State[Any]) -> dict[str, Any]:
    """The artifacts of one flow run, by key."""
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return {a.key: a for a in found}


def served_serial(lineage: Lineage, nginx: Nginx) -> str:
    return certificates.fetch_served_certificate(
        "127.0.0.1", nginx.port, nginx.server_name, ca_bundle=lineage.pebble.root_ca, timeout=3
    ).serial


def disk_serial(lineage: Lineage) -> str:
    return certificates.read_lineage(lineage.config_dir, lineage.cert_name).info.serial


def test_renewed_certificate_is_reloaded_and_served(
    acme_lineage: Lineage, lineage_nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, certificate_env(acme_lineage, lineage_nginx))
    before = served_serial(acme_lineage, lineage_nginx)

    state = renew_certificates(force=True, return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["due"] == ["shop"]
    assert result["dry_runs"] == {"shop": True}
    [renewed] = result["renewed"]
    assert renewed["old_serial"] == before
    assert renewed["new_serial"] != before
    # The evidence: what nginx serves now, read independently of the flow.
    assert served_serial(acme_lineage, lineage_nginx) == renewed["new_serial"] == disk_serial(acme_lineage)
    assert result["reload"] == [" ".join(lineage_nginx.reload_argv)]

    found = artifacts(state)
    table = json.loads(found["certificates-teststack-table"].data)
    statuses = {row["kind"]: row["status"] for row in table}
    assert statuses == {"lineage": "renewed", "endpoint": "ok"}
    assert all(row["days_left"] > 89 for row in table)
    markdown = found["certificates-teststack"].data
    assert "**ok**" in markdown
    assert f"serial {before} -> {renewed['new_serial']}" in markdown


def test_threshold_beyond_the_ca_lifetime_renews_once_and_says_so(
    acme_lineage: Lineage, lineage_nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "Renew early": a threshold above the CA's 90-day lifetime would make every certificate due
    # right after issue, so every run would renew, reload, and ask the CA again (into its rate limits).
    set_env(
        monkeypatch,
        certificate_env(acme_lineage, lineage_nginx, OPS_CERTIFICATES__RENEW_THRESHOLD_DAYS="100"),
    )
    before = served_serial(acme_lineage, lineage_nginx)

    state = renew_certificates(return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["due"] == []
    assert result["renewed"] == []
    assert disk_serial(acme_lineage) == before == served_serial(acme_lineage, lineage_nginx)
    markdown = artifacts(state)["certificates-teststack"].data
    assert "**ok**" in markdown
    assert "renew_threshold_days 100 would renew this 90-day certificate at every run" in markdown
    assert "OPS_CERTIFICATES__RENEW_THRESHOLD_DAYS to 60 or less" in markdown

    # A renewal with that threshold is judged by what the CA issued, not by the threshold: the new
    # 90-day certificate is served and the run completes.
    state = renew_certificates(force=True, return_state=True)

    assert state.is_completed(), state.message
    [renewed] = state.result()["renewed"]
    assert served_serial(acme_lineage, lineage_nginx) == renewed["new_serial"] != before


def test_nothing_due_renews_nothing_but_forced_renewal_does(
    acme_lineage: Lineage, lineage_nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, certificate_env(acme_lineage, lineage_nginx))
    before = served_serial(acme_lineage, lineage_nginx)

    state = renew_certificates(return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result == {
        "due": [],
        "renewed": [],
        "stale_endpoints": [],
        "reload": None,
        "endpoints": {f"shop.ops.test at 127.0.0.1:{lineage_nginx.port}": before},
        "dry_runs": {},
    }
    assert disk_serial(acme_lineage) == before

    state = renew_certificates(force=True, return_state=True)
    assert state.is_completed(), state.message
    [renewed] = state.result()["renewed"]
    assert renewed["old_serial"] == before
    assert served_serial(acme_lineage, lineage_nginx) == renewed["new_serial"] != before


def test_dry_run_parameter_stops_after_certbot_dry_run(
    acme_lineage: Lineage, lineage_nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, certificate_env(acme_lineage, lineage_nginx))
    before = disk_serial(acme_lineage)

    state = renew_certificates(force=True, dry_run=True, return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["dry_runs"] == {"shop": True}
    assert result["renewed"] == []
    assert result["reload"] is None
    assert disk_serial(acme_lineage) == before == served_serial(acme_lineage, lineage_nginx)
    assert "nothing was renewed or reloaded" in artifacts(state)["certificates-teststack"].data


def test_failing_dry_run_stops_before_renewal_and_nginx_keeps_the_valid_certificate(
    acme_lineage: Lineage, lineage_nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_server = f"https://127.0.0.1:{DEAD_PORT}/dir"
    set_env(
        monkeypatch,
        certificate_env(
            acme_lineage,
            lineage_nginx,
            OPS_CERTIFICATES__ACME_SERVER=dead_server,
            OPS_CERTIFICATES__FORCE_ACME_SERVER="true",
        ),
    )
    before = disk_serial(acme_lineage)

    state = renew_certificates(force=True, return_state=True)

    assert state.is_failed()
    assert "dry run of shop failed, so it was not renewed" in (state.message or "")
    assert "Connection refused" in (state.message or "")
    assert disk_serial(acme_lineage) == before
    # Still served, and still valid (the handshake validates chain, name and dates).
    assert served_serial(acme_lineage, lineage_nginx) == before
    found = artifacts(state)
    markdown = found["certificates-teststack"].data
    assert "**failed**" in markdown
    assert "dry run FAILED" in markdown
    assert "1 `swagger2mcp-ops.certificate.renewal-failed` event(s) emitted for: shop" in markdown
    table = json.loads(found["certificates-teststack-table"].data)
    assert {row["kind"]: row["status"] for row in table} == {"lineage": "due, not renewed", "endpoint": "ok"}


def test_failed_challenge_reports_its_cause_not_only_certbots_summary(
    acme_lineage: Lineage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # certbot answers the http-01 challenge on another port than the one the CA fetches it from.
    broken = copy_lineage(acme_lineage, tmp_path, http01_port=str(OTHER_HTTP01_PORT))
    set_env(monkeypatch, certificate_env(broken, None))
    refused = f"dial tcp 127.0.0.1:{HTTP01_PORT}: connect: connection refused"

    state = renew_certificates(force=True, return_state=True)

    assert state.is_failed()
    message = state.message or ""
    assert "dry run of shop failed, so it was not renewed" in message
    assert "Some challenges have failed" in message
    assert f"the CA reported: {broken.domain}: connection:" in message
    assert refused in message
    markdown = artifacts(state)["certificates-teststack"].data
    assert refused in markdown
    assert "1 `swagger2mcp-ops.certificate.renewal-failed` event(s) emitted for: shop" in markdown


def test_renewed_but_not_reloaded_is_a_finding_and_is_fixed(
    acme_lineage: Lineage, lineage_nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, certificate_env(acme_lineage, lineage_nginx))
    old = served_serial(acme_lineage, lineage_nginx)
    # certbot renews the files (as a cron job would) and nobody reloads nginx.
    record = certificates.renew_lineage(
        certificate_settings(acme_lineage, lineage_nginx), acme_lineage.cert_name
    )
    assert served_serial(acme_lineage, lineage_nginx) == old

    state = renew_certificates(return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    endpoint = f"shop.ops.test at 127.0.0.1:{lineage_nginx.port}"
    assert result["due"] == []
    assert result["stale_endpoints"] == [endpoint]
    assert result["reload"] == [" ".join(lineage_nginx.reload_argv)]
    assert result["endpoints"] == {endpoint: record.new_serial}
    assert served_serial(acme_lineage, lineage_nginx) == record.new_serial
    markdown = artifacts(state)["certificates-teststack"].data
    assert f"Renewed but not reloaded: {endpoint}" in markdown
    assert f"renewed but not reloaded: serves serial {old}" in markdown


def test_reload_that_does_not_take_effect_fails_naming_the_endpoint(
    acme_lineage: Lineage, lineage_nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(
        monkeypatch,
        certificate_env(
            acme_lineage,
            lineage_nginx,
            OPS_CERTIFICATES__RELOAD_METHOD="none",
            OPS_CERTIFICATES__VERIFY_TIMEOUT_SECONDS="1",
        ),
    )
    old = served_serial(acme_lineage, lineage_nginx)

    state = renew_certificates(force=True, return_state=True)

    assert state.is_failed()
    message = state.message or ""
    assert f"shop.ops.test at 127.0.0.1:{lineage_nginx.port}: still serves serial {old}" in message
    assert disk_serial(acme_lineage) in message
    table = json.loads(artifacts(state)["certificates-teststack-table"].data)
    [endpoint_row] = [row for row in table if row["kind"] == "endpoint"]
    assert endpoint_row["status"] == "failed"
    assert endpoint_row["serial"] == old


def test_bad_path_fails_before_any_change(
    acme_lineage: Lineage, lineage_nginx: Nginx, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "missing" / "cert.pem"
    set_env(
        monkeypatch,
        certificate_env(acme_lineage, lineage_nginx, OPS_CERTIFICATES__PEM_PATHS=json.dumps([str(missing)])),
    )
    before = disk_serial(acme_lineage)

    state = renew_certificates(force=True, return_state=True)

    assert state.is_failed()
    assert f"certificate file {missing} does not exist" in (state.message or "")
    assert disk_serial(acme_lineage) == before
    assert "CertificateFileError" in artifacts(state)["certificates-teststack"].data


def test_unreachable_endpoint_fails_with_a_clear_error(
    acme_lineage: Lineage, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoints = [{"host": "127.0.0.1", "port": DEAD_PORT, "server_name": acme_lineage.domain}]
    set_env(
        monkeypatch,
        certificate_env(acme_lineage, None, OPS_CERTIFICATES__ENDPOINTS=json.dumps(endpoints)),
    )

    state = renew_certificates(return_state=True)

    assert state.is_failed()
    assert f"nothing listens on 127.0.0.1:{DEAD_PORT} (connection refused)" in (state.message or "")


def test_due_file_certbot_does_not_manage_fails_and_emits_an_event(
    acme_lineage: Lineage,
    nginx_factory: Callable[[Path, Path, str], Nginx],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ca = make_ca("Internal CA")
    write_pem(tmp_path / "ca.pem", ca[0])
    # A 90-day certificate with 10 days left.
    now = dt.datetime.now(dt.UTC)
    leaf, key = make_leaf(
        ca,
        ["intranet.ops.test"],
        not_before=now - dt.timedelta(days=80),
        not_after=now + dt.timedelta(days=10),
    )
    cert_path = write_pem(tmp_path / "intranet.pem", leaf, key)
    nginx = nginx_factory(cert_path, cert_path.with_suffix(".key"), "intranet.ops.test")
    set_env(
        monkeypatch,
        certificate_env(
            acme_lineage,
            nginx,
            OPS_CERTIFICATES__LINEAGES="[]",
            OPS_CERTIFICATES__PEM_PATHS=json.dumps([str(cert_path)]),
            OPS_CERTIFICATES__CA_BUNDLE=str(tmp_path / "ca.pem"),
        ),
    )

    state = renew_certificates(return_state=True)

    assert state.is_failed()
    assert f"{cert_path} is due and certbot does not manage it" in (state.message or "")
    found = artifacts(state)
    assert f"event(s) emitted for: {cert_path}" in found["certificates-teststack"].data
    table = json.loads(found["certificates-teststack-table"].data)
    assert {row["kind"]: row["status"] for row in table} == {"pem": "due, not renewed", "endpoint": "ok"}
    assert [round(row["days_left"]) for row in table] == [10, 10]
