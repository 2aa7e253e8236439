"""The backup, verify, prune and restore flows under the Prefect test harness, against the real PostgreSQL
and a local storage directory."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.flow_runs import resume_flow_run

from flows.backup import backup_database, prune_backups, restore_database, verify_backup
from tasks import backup
from tasks.settings import load_settings
from tests.fixtures.core import wait_paused
from tests.fixtures.s3 import populate_backup_source, scratch_databases

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def _artifact(key: str) -> Any:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return max(found, key=lambda a: a.created)


def _count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def backup_env(ops_env: dict[str, Any]) -> dict[str, Any]:
    populate_backup_source(ops_env["dsn"], rows=200)
    return ops_env


def test_backup_flow_dumps_drills_and_reports(backup_env: dict[str, Any]) -> None:
    state = backup_database(verify="restore", return_state=True)
    assert state.is_completed(), state.message
    manifest = state.result()
    assert manifest["database"] == backup_env["database"]
    assert manifest["tables"]["public.items"]["rows"] == 200
    assert manifest["verifications"][-1]["level"] == "restore"
    assert manifest["verifications"][-1]["ok"] is True

    markdown = asyncio.run(_artifact("backup-teststack"))
    assert "**ok**" in markdown.data
    assert manifest["id"] in markdown.data
    assert "would delete 0" in markdown.data  # retention listed, dry run
    table = asyncio.run(_artifact("backup-teststack-tables"))
    assert table.type == "table"

    verified = verify_backup(backup_id="latest-verified", level="checksum", return_state=True)
    assert verified.is_completed(), verified.message
    assert verified.result()["ok"] is True
    listing = asyncio.run(_artifact("backups-teststack"))
    assert manifest["id"] in listing.data

    pruned = prune_backups(return_state=True)
    assert pruned.is_completed()
    assert pruned.result()["dry_run"] is True
    assert pruned.result()["keep"] == [manifest["id"]]


def test_backup_flow_fails_clearly_for_an_unknown_database(backup_env: dict[str, Any]) -> None:
    state = backup_database(database="ops_bk_not_there", return_state=True)
    assert state.is_failed()
    assert "ops_bk_not_there" in (state.message or "")
    markdown = asyncio.run(_artifact("backup-teststack"))
    assert "**failed**" in markdown.data
    assert not (backup_env["tmp"] / "backups" / "manifests").exists()


def test_restore_flow_dry_run_then_pre_approved_restore(backup_env: dict[str, Any]) -> None:
    dsn, name = backup_env["dsn"], backup_env["database"]
    backup = backup_database(verify="restore", prune=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM items WHERE id > 50")

    plan = restore_database(return_state=True)
    assert plan.is_completed(), plan.message
    assert plan.result()["dry_run"] is True
    assert plan.result()["backup_id"] == backup["id"]
    assert _count(dsn, "SELECT count(*) FROM items") == 50  # nothing touched
    markdown = asyncio.run(_artifact("restore-teststack"))
    assert "Restore plan (dry run)" in markdown.data

    state = restore_database(dry_run=False, approved=True, keep_old=False, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["matches"] is True
    assert result["old_kept"] is False
    assert _count(dsn, "SELECT count(*) FROM items") == 200
    assert scratch_databases(f"{name}__") == []
    report = asyncio.run(_artifact("restore-teststack")).data
    assert "**done**" in report
    assert f"matches backup {backup['id']}" in report


def test_restore_flow_refuses_unknown_backup_id(backup_env: dict[str, Any]) -> None:
    state = restore_database(
        backup_id="20200101T000000Z-nope-abcdef", dry_run=False, approved=True, return_state=True
    )
    assert state.is_failed()
    assert "no backup '20200101T000000Z-nope-abcdef'" in (state.message or "")
    assert scratch_databases(f"{backup_env['database']}__") == []


@pytest.mark.usefixtures("restore_leftovers")
def test_restore_flow_waits_for_approval_and_resumes(backup_env: dict[str, Any]) -> None:
    dsn, name = backup_env["dsn"], backup_env["database"]
    backup_database(verify="restore", prune=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM items")
    run_name = f"restore-approval-{name}"
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["state"] = restore_database.with_options(flow_run_name=run_name)(
            dry_run=False, keep_old=True, approval_timeout_seconds=120, return_state=True
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        paused = wait_paused(run_name)
        assert _count(dsn, "SELECT count(*) FROM items") == 0  # nothing before approval
        resume_flow_run(paused.id, run_input={"approve": True, "approver": "test", "reason": "test restore"})
    finally:
        thread.join(timeout=120)
    state = outcome["state"]
    assert state.is_completed(), state.message
    assert state.result()["old_kept"] is True
    assert _count(dsn, "SELECT count(*) FROM items") == 200
    leftovers = scratch_databases(f"{name}__")
    assert len(leftovers) == 1
    assert "__old_" in leftovers[0]


def test_latest_verified_skips_a_newer_unverified_backup(backup_env: dict[str, Any]) -> None:
    first = backup_database(verify="restore", prune=False)
    second = backup_database(verify="none", prune=False)
    settings = load_settings()
    assert backup.resolve_backup_id(settings, "latest").id == second["id"]
    assert backup.resolve_backup_id(settings, "latest-verified").id == first["id"]


def test_prune_flow_keeps_an_unreadable_backup_reports_it_and_fails(backup_env: dict[str, Any]) -> None:
    unreadable = backup_database(verify="checksum", prune=False)
    kept = backup_database(verify="none", prune=False)
    root = backup_env["tmp"] / "backups"
    manifest_file = root / "manifests" / f"{unreadable['id']}.json"
    broken = manifest_file.read_bytes()[:100]
    manifest_file.write_bytes(broken)

    state = prune_backups(confirm=True, return_state=True)
    assert state.is_failed()
    assert unreadable["id"] in (state.message or "")
    assert "unreadable" in (state.message or "")
    report = asyncio.run(_artifact("prune-backups-teststack")).data
    assert unreadable["id"] in report
    assert "Invalid JSON" in report
    assert manifest_file.read_bytes() == broken
    assert (root / "data" / f"{unreadable['id']}.dump.zst").exists()
    assert (root / "data" / f"{kept['id']}.dump.zst").exists()


@pytest.mark.usefixtures("restore_leftovers")
def test_undo_swaps_the_kept_database_back_with_proof(backup_env: dict[str, Any]) -> None:
    dsn, name = backup_env["dsn"], backup_env["database"]
    backup_database(verify="checksum", prune=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM items WHERE id > 120")  # the state the restore replaces
    restored = restore_database(
        backup_id="latest", dry_run=False, approved=True, keep_old=True, return_state=True
    ).result()
    kept = restored["old_database"]
    assert restored["kept_changed_tables"] == ["public.items"]
    assert _count(dsn, "SELECT count(*) FROM items") == 200
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items (id, name) VALUES (100001, 'written after the restore')")

    # A database that no restore of this one kept is refused before anything happens.
    wrong = restore_database(
        swap_back="postgres", target_database=name, dry_run=False, approved=True, return_state=True
    )
    assert wrong.is_failed()
    assert "is not a database a restore" in (wrong.message or "")
    plan = restore_database(swap_back=kept, target_database=name, return_state=True).result()
    assert plan["dry_run"] is True
    assert _count(dsn, "SELECT count(*) FROM items") == 201  # nothing touched

    # The same approval as a restore: the form pauses the run until it is approved.
    run_name = f"undo-approval-{name}"
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["state"] = restore_database.with_options(flow_run_name=run_name)(
            swap_back=kept,
            target_database=name,
            dry_run=False,
            approval_timeout_seconds=120,
            return_state=True,
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        paused = wait_paused(run_name)
        assert _count(dsn, "SELECT count(*) FROM items") == 201
        resume_flow_run(paused.id, run_input={"approve": True, "approver": "test", "reason": "undo"})
    finally:
        thread.join(timeout=120)
    state = outcome["state"]
    assert state.is_completed(), state.message
    undone = state.result()
    assert undone["matches"] is True
    assert f"matches backup kept database {kept}" in undone["evidence"]
    # The application's database is the kept one again, writable; the undone one is kept in its place.
    assert _count(dsn, "SELECT count(*) FROM items") == 120
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items (id, name) VALUES (100002, 'writable again')")
    replaced = undone["old_database"]
    assert replaced != kept
    assert replaced.startswith(f"{name}__old_")
    replaced_dsn = dsn.rsplit("/", 1)[0] + "/" + replaced
    assert _count(replaced_dsn, "SELECT count(*) FROM items WHERE id = 100001") == 1
    assert kept not in scratch_databases(f"{name}__")
    report = asyncio.run(_artifact("restore-teststack")).data
    assert "Undo (swap back)" in report
