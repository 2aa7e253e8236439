"""Backups to a real HTTP S3 endpoint (moto_server on loopback): multipart streaming, drills, faults,
credentials, and retention on both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tasks import backup as backups  # "backup" names a manifest in these tests
from tasks.backup.manifest import _storage
from tasks.storage import Storage, StorageError, WriteConflict, open_storage
from tests.fixtures.s3 import (
    SECRET_KEY,
    FaultProxy,
    backup_settings,
    populate_backup_source,
    s3_client,
    s3_storage_section,
    scratch_databases,
)

pytestmark = pytest.mark.integration


def _objects(endpoint: str, bucket: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def _uploads(endpoint: str, bucket: str) -> list[str]:
    return [u["Key"] for u in s3_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_backup_to_s3_restores_in_a_drill_equal_to_the_manifest(
    pg_database: tuple[str, str], moto_endpoint: str, s3_bucket: str
) -> None:
    name, dsn = pg_database
    populate_backup_source(dsn, rows=2000)
    settings = backup_settings(
        dsn,
        f"s3://{s3_bucket}/nightly/app",
        storage=s3_storage_section(moto_endpoint),
        backup={"restore_jobs": 1},
    )
    manifest = backups.create_backup(settings, verify="restore")

    assert manifest.verifications[-1].ok, manifest.verifications[-1].detail
    assert "2003 rows" in manifest.verifications[-1].detail
    assert _objects(moto_endpoint, s3_bucket) == [
        f"nightly/app/data/{manifest.id}.dump.zst",
        f"nightly/app/manifests/{manifest.id}.json",
    ]
    head = s3_client(moto_endpoint).head_object(
        Bucket=s3_bucket, Key=f"nightly/app/data/{manifest.id}.dump.zst"
    )
    assert head["ContentLength"] == manifest.size_bytes
    assert _uploads(moto_endpoint, s3_bucket) == []
    assert scratch_databases(f"{name}__") == []
    latest = backups.resolve_backup_id(settings, "latest-verified")
    assert latest.id == manifest.id


def test_s3_failing_mid_upload_retries_then_aborts_the_multipart_upload(
    pg_database: tuple[str, str], moto_endpoint: str, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    _name, dsn = pg_database
    with psycopg.connect(dsn, autocommit=True) as conn:
        # About 13 MB of hex text, about 7 MB compressed: two 5 MB parts, the failure lands mid-stream.
        conn.execute(
            "CREATE TABLE blobs AS SELECT g AS id, string_agg(md5(random()::text || h), '') AS v"
            " FROM generate_series(1, 13) g, generate_series(1, 32768) h GROUP BY g"
        )
    fault_proxy.fail_after_parts = 1
    storage = {**s3_storage_section(fault_proxy.endpoint), "multipart_chunk_mb": 5}
    settings = backup_settings(
        dsn, f"s3://{s3_bucket}/db", storage=storage, backup={"upload_attempts": 3, "restore_jobs": 1}
    )
    with pytest.raises(StorageError) as caught:
        backups.create_backup(settings, verify="none")

    message = str(caught.value)
    assert "InternalError" in message
    assert "multipart upload was aborted" in message
    assert fault_proxy.failed_part_requests == 3  # bounded: upload_attempts per request, then give up
    assert fault_proxy.aborts == 1
    assert _uploads(moto_endpoint, s3_bucket) == []
    assert _objects(moto_endpoint, s3_bucket) == []  # no data object, no manifest

    fault_proxy.fail_after_parts = None
    manifest = backups.create_backup(settings, verify="checksum")
    assert manifest.size_bytes > 5 * 1024 * 1024  # more than one part
    assert [m.id for m in backups.list_backups(settings)] == [manifest.id]


def test_corrupted_s3_object_is_refused_before_any_restore(
    pg_database: tuple[str, str], moto_endpoint: str, s3_bucket: str
) -> None:
    name, dsn = pg_database
    populate_backup_source(dsn)
    settings = backup_settings(dsn, f"s3://{s3_bucket}", storage=s3_storage_section(moto_endpoint))
    manifest = backups.create_backup(settings, verify="none")
    client = s3_client(moto_endpoint)
    key = f"data/{manifest.id}.dump.zst"
    body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_bucket, Key=key, Body=body[:-100])

    with pytest.raises(backups.BackupCorrupt, match="truncated"):
        backups.restore_backup(settings, manifest.id)
    result = backups.verify_backup(settings, manifest.id, "catalog")
    assert not result.ok
    assert scratch_databases(f"{name}__") == []


def test_wrong_s3_credentials_fail_clearly_with_the_secret_masked(
    pg_database: tuple[str, str], moto_auth_endpoint: str, tmp_path: Path
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=10)
    settings = backup_settings(dsn, "s3://ops-bk-auth/db", storage=s3_storage_section(moto_auth_endpoint))
    with pytest.raises(StorageError) as caught:
        backups.create_backup(settings, verify="none")
    message = str(caught.value)
    assert "InvalidAccessKeyId" in message
    assert "OPS_STORAGE__ACCESS_KEY_ID" in message
    assert SECRET_KEY not in message
    with pytest.raises(StorageError, match="InvalidAccessKeyId"):
        backups.list_backups(settings)


@pytest.fixture(params=["file", "s3"])
def storage_for_retention(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """Settings for this test's database on local files or on the S3 emulator; keyword arguments
    override the backup section."""
    tiers = {"keep_last": 1, "keep_daily": 1, "keep_weekly": 0, "keep_monthly": 0}
    if request.param == "file":
        return lambda dsn, **backup: backup_settings(dsn, f"file://{tmp_path}", backup={**tiers, **backup})
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return lambda dsn, **backup: backup_settings(
        dsn, f"s3://{bucket}/keep", storage=s3_storage_section(endpoint), backup={**tiers, **backup}
    )


def test_retention_dry_run_lists_and_confirm_deletes_keeping_newest_verified(
    pg_database: tuple[str, str], storage_for_retention: Callable[[str], Any]
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=20)
    settings = storage_for_retention(dsn)
    oldest = backups.create_backup(settings, verify="restore")
    middle = backups.create_backup(settings, verify="none")
    newest = backups.create_backup(settings, verify="none")
    assert [m.id for m in backups.list_backups(settings)] == [newest.id, middle.id, oldest.id]

    dry = backups.prune_backups(settings)
    assert dry.dry_run
    assert [d.backup_id for d in dry.plan.to_delete] == [middle.id]
    kept = {d.backup_id: d.reasons for d in dry.plan.to_keep}
    assert kept == {newest.id: ["keep-last", "daily"], oldest.id: ["newest verified"]}
    assert len(backups.list_backups(settings)) == 3  # nothing deleted

    done = backups.prune_backups(settings, confirm=True)
    assert not done.dry_run
    assert done.deleted_backups == [middle.id]
    assert [m.id for m in backups.list_backups(settings)] == [newest.id, oldest.id]
    storage = _storage(settings)
    assert not storage.exists(backups.data_key(middle.id))
    assert storage.exists(backups.data_key(oldest.id))

    again = backups.prune_backups(settings, confirm=True)
    assert not again.changed


def _break_manifest(settings: Any, backup_id: str, how: str) -> bytes:
    """Make a manifest unreadable the way it happens: cut short, or written by a newer version."""
    storage = _storage(settings)
    key = backups.manifest_key(backup_id)
    raw = storage.get_bytes(key)
    if how == "truncated":
        broken = raw[: len(raw) // 2]
    else:
        doc = json.loads(raw)
        doc["verifications"].append(
            {"level": "restore-pitr", "ok": True, "at": "2026-01-01T00:00:00Z", "detail": "newer level"}
        )
        broken = json.dumps(doc).encode()
    storage.put_bytes(key, broken)
    return broken


@pytest.mark.parametrize("how", ["truncated", "newer-level"])
def test_prune_never_deletes_a_backup_whose_manifest_it_cannot_read(
    pg_database: tuple[str, str], storage_for_retention: Callable[..., Any], how: str
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=20)
    # A grace shorter than the test: without the fix the unreadable backup's data counts as an orphan.
    settings = storage_for_retention(dsn, orphan_grace_hours=0.0001)
    only_verified = backups.create_backup(settings, verify="checksum")
    older = backups.create_backup(settings, verify="none")
    newest = backups.create_backup(settings, verify="none")
    broken = _break_manifest(settings, only_verified.id, how)
    time.sleep(0.5)

    dry = backups.prune_backups(settings)
    assert [u.backup_id for u in dry.plan.unknown] == [only_verified.id]
    error = dry.plan.unknown[0].error
    assert ("JSON" in error) if how == "truncated" else ("restore-pitr" in error), error
    assert dry.plan.orphans == []
    assert only_verified.id not in [d.backup_id for d in dry.plan.decisions]

    done = backups.prune_backups(settings, confirm=True)
    assert done.deleted_backups == [older.id]
    assert done.deleted_objects == []
    storage = _storage(settings)
    assert storage.exists(backups.data_key(only_verified.id))
    assert storage.get_bytes(backups.manifest_key(only_verified.id)) == broken
    assert [m.id for m in backups.list_backups(settings)] == [newest.id]


def test_the_only_verified_backup_and_its_unreadable_sibling_are_both_kept(
    pg_database: tuple[str, str], storage_for_retention: Callable[..., Any]
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=20)
    settings = storage_for_retention(dsn, orphan_grace_hours=0.0001)
    verified = backups.create_backup(settings, verify="checksum")
    sibling = backups.create_backup(settings, verify="none")
    newest = backups.create_backup(settings, verify="none")
    _break_manifest(settings, sibling.id, "truncated")
    time.sleep(0.5)

    done = backups.prune_backups(settings, confirm=True)
    assert {d.backup_id: d.reasons for d in done.plan.to_keep} == {
        newest.id: ["keep-last", "daily"],
        verified.id: ["newest verified"],
    }
    assert [u.backup_id for u in done.plan.unknown] == [sibling.id]
    assert not done.changed
    storage = _storage(settings)
    for backup in (verified, sibling, newest):
        assert storage.exists(backups.data_key(backup.id))
        assert storage.exists(backups.manifest_key(backup.id))


def test_orphan_data_without_a_manifest_is_removed_only_past_the_grace(
    pg_database: tuple[str, str], storage_for_retention: Callable[..., Any]
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=20)
    settings = storage_for_retention(dsn, orphan_grace_hours=0.001)  # 3.6 s
    backup = backups.create_backup(settings, verify="checksum")
    storage = _storage(settings)
    old = backups.data_key("20200101T000000Z-gone-aaaaaa")
    finishing = backups.data_key("20200101T000000Z-finishing-bbbbbb")
    young = backups.data_key("20200101T000000Z-young-cccccc")
    storage.put_bytes(old, b"old orphan")
    storage.put_bytes(finishing, b"a backup whose manifest lands after the plan")
    time.sleep(5)
    storage.put_bytes(young, b"young orphan")

    plan = backups.retention_plan(settings)
    assert sorted(plan.orphans) == sorted([old, finishing])
    assert plan.unknown == []
    # The manifest is written last: a backup that finishes between the plan and the deletion keeps
    # its data.
    late = backup.model_copy(update={"id": "20200101T000000Z-finishing-bbbbbb"})
    backups.write_manifest(storage, late)
    done = backups.delete_backups(settings, plan, confirm=True)
    assert done.deleted_objects == [old]
    assert not storage.exists(old)
    assert storage.exists(finishing)
    assert storage.exists(young)
    assert storage.exists(backups.data_key(backup.id))


@pytest.fixture(params=["file", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    from tasks.settings import StorageSettings

    if request.param == "file":
        return open_storage(StorageSettings(url=f"file://{tmp_path}"))
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(StorageSettings(url=f"s3://{bucket}/cas", **s3_storage_section(endpoint)))


def test_conditional_put_writes_only_over_the_version_it_read(any_storage: Storage) -> None:
    key = "manifests/x.json"
    first = any_storage.put_if_version(key, b"one", None)  # create only when absent
    with pytest.raises(WriteConflict):
        any_storage.put_if_version(key, b"again", None)
    current = any_storage.get_versioned(key)
    assert (current.data, current.version) == (b"one", first)

    second = any_storage.put_if_version(key, b"two", current.version)
    assert second != first
    with pytest.raises(WriteConflict):
        any_storage.put_if_version(key, b"stale", first)
    assert any_storage.get_bytes(key) == b"two"
    assert any_storage.get_versioned(key).version == second
    assert [o.key for o in any_storage.list("manifests")] == [key]  # no lock or temporary objects shown


_VERIFY_CHILD = """
import json, pathlib, sys, time
from tasks import backup as backups
from tests.fixtures.s3 import backup_settings
args = json.loads(sys.argv[1])
settings = backup_settings(args["dsn"], args["url"], storage=args["storage"])
pathlib.Path(args["ready"]).touch()
while not pathlib.Path(args["go"]).exists():
    time.sleep(0.005)
for _ in range(args["rounds"]):
    assert backups.verify_backup(settings, args["id"], "checksum").ok
"""


@pytest.fixture(params=["file", "s3"])
def verify_target(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[str, dict[str, Any], FaultProxy | None]:
    """Storage url and section for concurrent verifications: local files, or S3 through the proxy that
    makes both verifications read the manifest at the same version before either writes."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}", {}, None
    proxy: FaultProxy = request.getfixturevalue("fault_proxy")
    bucket = request.getfixturevalue("s3_bucket")
    proxy.meet_reads = "/manifests/"
    return f"s3://{bucket}/verify", s3_storage_section(proxy.endpoint), proxy


def test_concurrent_verifications_of_one_backup_are_all_recorded(
    pg_database: tuple[str, str], verify_target: tuple[str, dict[str, Any], FaultProxy | None], tmp_path: Path
) -> None:
    _name, dsn = pg_database
    populate_backup_source(dsn, rows=20)
    url, storage_section, proxy = verify_target
    settings = backup_settings(dsn, url, storage=storage_section)
    manifest = backups.create_backup(settings, verify="none")
    root = Path(__file__).resolve().parents[2]
    rounds, children = 3, []
    for n in range(2):
        args = {
            "dsn": dsn,
            "url": url,
            "storage": storage_section,
            "id": manifest.id,
            "rounds": rounds,
            "ready": str(tmp_path / f"ready-{n}"),
            "go": str(tmp_path / "go"),
        }
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", _VERIFY_CHILD, json.dumps(args)],
                cwd=root,
                env={**os.environ, "PYTHONPATH": str(root)},
            )
        )
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{n}").exists() for n in range(2)):
            assert time.monotonic() < deadline, "the verifying processes did not start"
            assert all(c.poll() is None for c in children), "a verifying process died while starting"
            time.sleep(0.05)
        (tmp_path / "go").touch()
    finally:
        codes = [c.wait(timeout=300) for c in children]
    assert codes == [0, 0]
    recorded = backups.read_manifest(_storage(settings), manifest.id).verifications
    assert len(recorded) == 2 * rounds
    assert all(v.level == "checksum" and v.ok for v in recorded)
    if proxy is not None:
        assert proxy.met >= 1  # the two verifications did read the same version at least once
