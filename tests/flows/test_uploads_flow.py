"""The cleanup-uploads and restore-uploads flows under the Prefect harness, on real files and the real
PostgreSQL (the application's uploads table for the reference check)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.states import State

from flows.uploads import cleanup_uploads, restore_quarantine

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.flow, pytest.mark.integration]

DAY = 86400


def put(path: Path, age_days: float, content: bytes = b"upload") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def artifacts(state: State[Any]) -> dict[str, Any]:
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return {a.key: a for a in found}


def task_names(state: State[Any]) -> list[str]:
    """The names of the task runs of a flow run (its steps as the UI lists them)."""
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return [r.name.rsplit("-", 1)[0] for r in runs]


@pytest.fixture
def uploads_env(ops_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """An uploads root with old, new, protected and referenced files, plus a symlink leading outside."""
    tmp: Path = ops_env["tmp"]
    root = tmp / "uploads"
    put(root / "specs" / "old-unused.json", 45, b"old unused")
    put(root / "specs" / "old-referenced.json", 45, b"old referenced")
    put(root / "specs" / "fresh.json", 2, b"fresh")
    put(root / ".gitkeep", 400, b"")
    put(root / "big-old.bin", 90, b"x" * 4096)
    put(tmp / "outside" / "secret", 400, b"secret")
    os.symlink(tmp / "outside", root / "escape")
    with psycopg.connect(ops_env["dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE uploads (path text PRIMARY KEY)")
        conn.execute("INSERT INTO uploads VALUES ('specs/old-referenced.json')")
    monkeypatch.setenv("OPS_UPLOADS__REFERENCE_QUERY", "SELECT path FROM uploads")
    return {**ops_env, "root": root, "plans": tmp / "backups" / "uploads-plans"}


def test_dry_run_reports_the_plan_and_changes_nothing(uploads_env: dict[str, Any]) -> None:
    root: Path = uploads_env["root"]
    before = tree(root)

    state = cleanup_uploads(return_state=True)

    assert state.is_completed()
    report = state.result()
    assert tree(root) == before
    assert report.counts() == {
        "scanned": 5,
        "matched": 4,
        "kept_referenced": 1,
        "kept_protected": 1,
        "kept_changed": 0,
        "planned": 2,
        "acted": 0,
        "bytes_freed": 0,
        "errors": 0,
    }
    plan = Path(report.plan.plan_path)
    assert plan.parent == uploads_env["plans"]
    assert {json.loads(line)["path"] for line in plan.read_text().splitlines()} == {
        "specs/old-unused.json",
        "big-old.bin",
    }
    assert not (uploads_env["tmp"] / ".uploads-quarantine").exists()
    found = artifacts(state)
    markdown = found["uploads-cleanup-teststack"].data
    assert "dry run" in markdown
    assert str(plan) in markdown
    assert "would be quarantined" in markdown
    rows = json.loads(found["uploads-cleanup-teststack-files"].data)
    assert rows[0]["path"] == "big-old.bin"


def test_quarantine_then_restore(uploads_env: dict[str, Any]) -> None:
    root: Path = uploads_env["root"]
    before = tree(root)

    state = cleanup_uploads(dry_run=False, return_state=True)

    assert state.is_completed()
    report = state.result()
    assert report.counts()["acted"] == 2
    assert report.counts()["bytes_freed"] == len(b"old unused") + 4096
    assert set(tree(root)) == {"specs/old-referenced.json", "specs/fresh.json", ".gitkeep"}
    assert (uploads_env["tmp"] / "outside" / "secret").read_bytes() == b"secret"
    markdown = artifacts(state)["uploads-cleanup-teststack"].data
    assert f"run_id={report.run_id}" in markdown
    assert "## Disk space" in markdown

    # The plan pruning is a step of its own in the UI; taking the root's lock is not a task.
    names = task_names(state)
    assert "prune-uploads-plans" in names
    assert not any("lock" in name for name in names)

    restored = restore_quarantine(run_id=report.run_id, return_state=True)

    assert restored.is_completed()
    assert restored.result().restored == 2
    assert tree(root) == before
    assert "prune-uploads-plans" not in task_names(restored)  # a restore prunes no plans
    assert "restored" in artifacts(restored)["uploads-restore-teststack"].data


def test_delete_mode_with_a_reviewed_plan(uploads_env: dict[str, Any]) -> None:
    root: Path = uploads_env["root"]
    dry = cleanup_uploads(return_state=True).result()
    os.utime(root / "big-old.bin")  # someone touched it after the review

    state = cleanup_uploads(dry_run=False, mode="delete", plan_run_id=dry.run_id, return_state=True)

    report = state.result()
    assert (report.counts()["acted"], report.counts()["kept_changed"]) == (1, 1)
    assert not (root / "specs" / "old-unused.json").exists()
    assert (root / "big-old.bin").exists()
    assert not (uploads_env["tmp"] / ".uploads-quarantine").exists()
    assert "Changed since the plan" in artifacts(state)["uploads-cleanup-teststack"].data


def test_bad_parameters_fail_before_anything_happens(uploads_env: dict[str, Any]) -> None:
    root: Path = uploads_env["root"]
    before = tree(root)
    state = cleanup_uploads(older_than_days=0, dry_run=False, return_state=True)
    assert state.is_failed()
    state = cleanup_uploads(dry_run=False, plan_run_id="../../etc/passwd", return_state=True)
    assert state.is_failed()
    assert tree(root) == before
    assert not uploads_env["plans"].exists()
    state = restore_quarantine(run_id="not-a-run", return_state=True)
    assert state.is_failed()


def test_unreachable_database_fails_the_run_and_still_reports(
    uploads_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root: Path = uploads_env["root"]
    before = tree(root)
    monkeypatch.setenv("OPS_POSTGRES__DSN", "postgresql://postgres:hunter2@127.0.0.1:9/app")

    state = cleanup_uploads(dry_run=False, mode="delete", return_state=True)

    assert state.is_failed()
    assert tree(root) == before
    markdown = artifacts(state)["uploads-cleanup-teststack"].data
    assert "failed" in markdown
    assert "cannot reach the application's database" in markdown
    assert "hunter2" not in markdown


@pytest.mark.parametrize("where", ["filesystem-root", "symlink-to-etc"])
def test_a_root_pointing_at_the_system_is_refused_before_anything_is_scanned(
    uploads_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    tmp: Path = uploads_env["tmp"]
    if where == "filesystem-root":
        root = "/"
    else:
        (tmp / "etc-link").symlink_to("/etc")
        root = str(tmp / "etc-link")
    monkeypatch.setenv("OPS_UPLOADS__ROOT", root)

    state = cleanup_uploads(mode="delete", return_state=True)

    assert state.is_failed()
    assert not uploads_env["plans"].exists()  # no plan: nothing was scanned
    markdown = artifacts(state)["uploads-cleanup-teststack"].data
    assert "refused" in markdown
    assert "OPS_UPLOADS__ROOT" in markdown

    restored = restore_quarantine(run_id="20260101T000000Z-abcdef", return_state=True)

    assert restored.is_failed()
    assert "refused" in artifacts(restored)["uploads-restore-teststack"].data


def test_zero_day_quarantine_retention_fails_before_anything_moves(
    uploads_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root: Path = uploads_env["root"]
    before = tree(root)
    monkeypatch.setenv("OPS_UPLOADS__QUARANTINE_RETENTION_DAYS", "0")

    state = cleanup_uploads(dry_run=False, return_state=True)

    assert state.is_failed()
    assert tree(root) == before
    assert not (uploads_env["tmp"] / ".uploads-quarantine").exists()
