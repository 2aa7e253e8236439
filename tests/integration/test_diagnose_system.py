"""Diagnose's host evidence: disk space, the uploads directory's permissions, TCP reachability and DNS,
on the real filesystem, the real PostgreSQL and Redis, and the real resolver."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import SecretStr

from tasks import diagnose as d
from tasks.diagnose import Severity
from tasks.settings import (
    DiagnoseSettings,
    HealthSettings,
    OpsSettings,
    PostgresSettings,
    RedisSettings,
    StorageSettings,
    UploadsSettings,
)
from tests.fixtures.core import PG_ADMIN_DSN, REDIS_BASE_URL
from tests.fixtures.diag_services import DIAG_CLOSED_PORT


def test_disk_space_measures_each_filesystem_once(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    settings = OpsSettings(
        uploads=UploadsSettings(root=uploads),
        storage=StorageSettings(url=f"file://{tmp_path / 'backups-not-yet-created'}"),
    )
    paths = d.disk_paths(settings)
    assert paths[:2] == [uploads, tmp_path / "backups-not-yet-created"]
    diagnosis = d.disk_space(paths, DiagnoseSettings())
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.DiskEvidence)
    assert len(evidence.disks) == 1  # same filesystem: one row
    disk = evidence.disks[0]
    real = shutil.disk_usage(tmp_path)
    assert disk.total == real.total
    assert abs(disk.free - real.free) < 200 * 2**20
    # A missing path is measured at its nearest existing ancestor.
    missing = d.disk_space([tmp_path / "a" / "b"], DiagnoseSettings()).evidence
    assert isinstance(missing, d.DiskEvidence)
    assert missing.disks[0].checked == str(tmp_path)
    # Thresholds above the real free space make it a finding that points at cleanup-uploads.
    free = disk.free_ratio
    strict = DiagnoseSettings(disk_free_warn_ratio=min(0.99, free + 0.01), disk_free_critical_ratio=0.01)
    warned = d.disk_space([uploads], strict)
    assert warned.findings[0].severity is Severity.WARNING
    assert warned.findings[0].flow == d.FLOW_CLEANUP_UPLOADS


def test_uploads_directory_permissions(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    missing = d.uploads_permissions(OpsSettings(uploads=UploadsSettings(root=root)))
    assert missing.findings[0].severity is Severity.CRITICAL
    assert "does not exist" in missing.findings[0].summary

    root.mkdir()
    for i in range(3):
        (root / f"spec-{i}.json").write_text("{}")
    root.chmod(0o755)
    owner = Path(root).owner()
    fine = d.uploads_permissions(OpsSettings(uploads=UploadsSettings(root=root, expected_owner=owner)))
    assert fine.severity is Severity.OK
    evidence = fine.evidence
    assert isinstance(evidence, d.UploadsEvidence)
    assert evidence.entry_count == 3
    rows = fine.rows()
    assert rows[0]["name"] == "."
    assert rows[0]["mode"] == "drwxr-xr-x (0755)"
    assert [r["name"] for r in rows[1:]] == ["spec-0.json", "spec-1.json", "spec-2.json"]

    root.chmod(0o777)
    loose = d.uploads_permissions(
        OpsSettings(uploads=UploadsSettings(root=root, expected_owner="nobody", expected_mode="0755"))
    )
    summaries = [(f.severity, f.summary) for f in loose.findings]
    assert (
        Severity.CRITICAL,
        f"{root} is owned by {owner}, expected nobody: the backend may not write there",
    ) in (summaries)
    assert any(s is Severity.WARNING and "mode 0777, expected 0755" in text for s, text in summaries)
    assert any(s is Severity.WARNING and "world-writable" in text for s, text in summaries)

    root.chmod(0o555)
    try:
        readonly = d.uploads_permissions(OpsSettings(uploads=UploadsSettings(root=root)))
        assert any("not writable by its owner" in f.summary for f in readonly.findings)
    finally:
        root.chmod(0o755)


def test_reachability_and_dns() -> None:
    settings = OpsSettings(
        postgres=PostgresSettings(dsn=SecretStr(PG_ADMIN_DSN)),
        redis=RedisSettings(url=SecretStr(f"{REDIS_BASE_URL}/0")),
        health=HealthSettings(urls=["http://localhost:8080/health"]),
        diagnose=DiagnoseSettings(resolve_hosts=["nosuch-host.invalid"], network_timeout_seconds=3),
    )
    diagnosis = d.network(settings)
    evidence = diagnosis.evidence
    assert isinstance(evidence, d.NetworkEvidence)
    assert [(p.name, p.ok) for p in evidence.tcp] == [("postgres", True), ("redis", True)]
    dns = {lookup.host: lookup for lookup in evidence.dns}
    assert dns["127.0.0.1"].addresses == ("127.0.0.1",)
    assert dns["localhost"].error is None
    assert dns["localhost"].addresses
    assert dns["nosuch-host.invalid"].error is not None
    findings = diagnosis.findings
    assert [f.severity for f in findings] == [Severity.CRITICAL]
    assert "nosuch-host.invalid does not resolve" in findings[0].summary
    assert findings[0].runbook == d.RB_NETWORK


def test_refused_tcp_is_critical_with_the_runbook_resolution() -> None:
    settings = OpsSettings(
        postgres=PostgresSettings(
            dsn=SecretStr(f"postgresql://app:HiddenPw@127.0.0.1:{DIAG_CLOSED_PORT}/app")
        ),
        redis=RedisSettings(url=SecretStr(f"{REDIS_BASE_URL}/0")),
    )
    diagnosis = d.network(settings)
    finding = diagnosis.findings[0]
    assert finding.severity is Severity.CRITICAL
    assert f"postgres at 127.0.0.1:{DIAG_CLOSED_PORT} is not reachable" in finding.summary
    assert finding.runbook == d.RB_DATABASE
    assert finding.flow == d.FLOW_RESTART
    assert "HiddenPw" not in str(diagnosis.rows())
