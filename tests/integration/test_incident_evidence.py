"""Evidence bundles from the real PostgreSQL and Redis, into a local directory and into S3 (moto):
every file in the manifest, the manifest verified, tampering, deletion and additions detected."""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tasks import incidents
from tasks.runtime import NoRuntime
from tasks.settings import load_settings
from tasks.storage import LocalStorage, open_storage
from tests.fixtures.s3 import s3_storage_section

PASSWORD = "evidence-dsn-password-42"


def _with_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{PASSWORD}@{parts.hostname}:{parts.port}"))


@pytest.fixture
def evidence_settings(pg_database, redis_db, tmp_path):
    _, dsn = pg_database
    return load_settings(
        stack="evidencetest",
        # The shared server trusts local connections: the password is accepted, and must be masked.
        postgres={"dsn": _with_password(dsn)},
        redis={"url": redis_db},
        storage={"url": f"file://{tmp_path / 'store'}"},
        runtime={"release_store": str(tmp_path / "releases")},
        health={"timeout_seconds": 3},
    )


def test_bundle_holds_the_evidence_and_verifies(evidence_settings, pg_database, tmp_path):
    _name, dsn = pg_database
    with psycopg.connect(dsn, application_name="suspicious-session") as other:
        other.execute("SELECT 1")
        bundle = incidents.collect_evidence_bundle(evidence_settings, NoRuntime())
    paths = {f.path for f in bundle.manifest.files}
    assert {
        "postgres/pg_stat_activity.json",
        "postgres/roles.json",
        "redis/info.json",
        "health.json",
        "runtime/history.json",
        "runtime/services.json",
        "runtime/resource_usage.json",
        "releases/releases.json",
    } <= paths
    assert bundle.manifest.errors == {}
    root = tmp_path / "store" / bundle.prefix
    activity = json.loads((root / "postgres/pg_stat_activity.json").read_text())
    assert any(row.get("application_name") == "suspicious-session" for row in activity)
    health = json.loads((root / "health.json").read_text())
    assert health["checks"]["postgres"]["status"] == "healthy"
    for path in root.rglob("*"):
        if path.is_file():
            assert PASSWORD not in path.read_text(), path
    assert bundle.prefix.startswith("incidents/")
    assert "evidencetest" in bundle.prefix

    verification = incidents.verify_bundle(evidence_settings, bundle)
    assert verification.ok, verification.summary()
    assert verification.files_checked == len(paths)


def test_tampering_is_detected(evidence_settings, tmp_path):
    bundle = incidents.collect_evidence_bundle(evidence_settings, NoRuntime())
    storage = LocalStorage(tmp_path / "store")
    root = tmp_path / "store" / bundle.prefix
    bundle_id = bundle.manifest.bundle_id

    (root / "health.json").write_text('{"status": "healthy"}\n')
    (root / "redis/info.json").unlink()
    (root / "logs").mkdir()
    (root / "logs/planted.log").write_text("nothing to see\n")
    result = incidents.verify_evidence_bundle(
        storage, "incidents", bundle_id, manifest_sha256=bundle.manifest_sha256
    )
    assert not result.ok
    assert result.mismatched == ("health.json",)
    assert result.missing == ("redis/info.json",)
    assert result.unlisted == ("logs/planted.log",)
    assert not result.manifest_mismatch

    # A forger who also rewrites the manifest is caught by the digest kept in the report.
    manifest = incidents.EvidenceManifest.model_validate_json((root / "manifest.json").read_text())
    manifest.files = [f for f in manifest.files if f.path not in {"health.json", "redis/info.json"}]
    (root / "manifest.json").write_text(manifest.model_dump_json())
    (root / "logs/planted.log").unlink()
    (root / "health.json").unlink()
    forged = incidents.verify_evidence_bundle(storage, "incidents", bundle_id)
    assert forged.ok  # consistent with itself...
    caught = incidents.verify_evidence_bundle(
        storage, "incidents", bundle_id, manifest_sha256=bundle.manifest_sha256
    )
    assert caught.manifest_mismatch  # ...but not with what the report recorded
    assert "manifest differs" in caught.summary()


def test_bundle_in_s3(s3_bucket, moto_endpoint):
    settings = load_settings(storage={"url": f"s3://{s3_bucket}/ops", **s3_storage_section(moto_endpoint)})
    storage = open_storage(settings.storage)
    files = {"logs/backend.log": b"line 1\nline 2\n", "postgres/pg_stat_activity.json": b"[]\n"}
    bundle = incidents.write_evidence_bundle(
        storage, "incidents", "b1", "stack", files, {"redis/info": "down"}
    )
    assert bundle.location.startswith(f"s3://{s3_bucket}/ops")
    assert incidents.verify_evidence_bundle(
        storage, "incidents", "b1", manifest_sha256=bundle.manifest_sha256
    ).ok
    storage.put_bytes("incidents/b1/logs/backend.log", b"line 1\n")
    result = incidents.verify_evidence_bundle(storage, "incidents", "b1")
    assert result.mismatched == ("logs/backend.log",)
    assert json.loads(storage.get_bytes("incidents/b1/manifest.json"))["errors"] == {"redis/info": "down"}
