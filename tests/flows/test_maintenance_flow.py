"""maintenance-window under the Prefect harness: real PostgreSQL, a real HTTP endpoint for the
application's maintenance switch (a local server recording what it was asked), a real command."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fixtures.migrations import ADD_NAME, BACKFILL, BAD_SQL, Revision, snapshot, use
from tests.fixtures.ports import claim_port

pytestmark = [pytest.mark.flow, pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

MAINTENANCE_PORT = claim_port()


@pytest.fixture
def maintenance_endpoint() -> Iterator[list[tuple[str, str]]]:
    """The app's maintenance switch: records (method, path) and answers 204."""
    calls: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            calls.append((self.command, self.path))
            self.send_response(204)
            self.end_headers()

        do_POST = do_DELETE = do_PUT = _answer

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", MAINTENANCE_PORT), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield calls
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_window(**params: Any) -> Any:
    from flows.maintenance import maintenance_window

    return maintenance_window(**params, return_state=True)


def test_dry_run_changes_nothing_and_says_no_maintenance_mode(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME]))
    before = snapshot(mg_env["dsn"])
    state = run_window()
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["outcome"] == "dry-run"
    assert summary["maintenance_mode_configured"] is False
    assert summary["migration"]["outcome"] == "dry-run"
    assert summary["migration"]["pending"] == ["r1_add_name"]
    steps = {name: (status, detail) for name, status, detail in summary["steps"]}
    assert steps["maintenance mode on"][0] == "not configured"
    assert "stays reachable" in steps["maintenance mode on"][1]
    assert steps["backup"][0] == "skipped"
    assert snapshot(mg_env["dsn"]) == before
    assert not (mg_env["tmp"] / "backups").exists() or not list((mg_env["tmp"] / "backups").rglob("*.json"))


def test_window_switches_mode_backs_up_migrates_and_smokes(
    monkeypatch, mg_env, alembic_env, maintenance_endpoint
):
    use(monkeypatch, alembic_env([ADD_NAME, BACKFILL]))
    base = f"http://127.0.0.1:{MAINTENANCE_PORT}/admin/maintenance"
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_ON_URL", base + "?on=1")
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_OFF_URL", base + "?on=0")
    monkeypatch.setenv(
        "OPS_MIGRATIONS__SMOKE_QUERIES", '["SELECT count(*) = 200 FROM users WHERE name IS NOT NULL"]'
    )
    state = run_window(dry_run=False, approved=True, message="Upgrade tonight")
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["outcome"] == "completed"
    assert maintenance_endpoint == [("POST", "/admin/maintenance?on=1"), ("POST", "/admin/maintenance?on=0")]
    assert summary["backup_id"]
    assert list((mg_env["tmp"] / "backups").rglob(f"*{summary['backup_id']}*"))
    assert summary["migration"]["outcome"] == "migrated"
    assert summary["smoke_ok"] is True
    names = [s[0] for s in summary["steps"]]
    assert names.index("maintenance mode on") < names.index("backup") < names.index("migrate")
    assert names.index("migrate") < names.index("smoke tests") < names.index("maintenance mode off")
    with psycopg.connect(mg_env["dsn"]) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("r2_backfill",)


def test_failed_migration_is_restored_and_mode_turned_off(monkeypatch, mg_env, alembic_env, tmp_path: Path):
    use(monkeypatch, alembic_env([ADD_NAME, BAD_SQL]))
    switch_log = tmp_path / "switch.log"
    switch = [sys.executable, "-c", f"import sys; open({str(switch_log)!r}, 'a').write(sys.argv[1] + '\\n')"]
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_ON_ARGV", json.dumps([*switch, "on"]))
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_OFF_ARGV", json.dumps([*switch, "off"]))
    before = snapshot(mg_env["dsn"])
    state = run_window(dry_run=False, approved=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"(?s)migration failed.*maintenance mode is off"):
        state.result()
    # The restore was proven by the subflow, so the old application can serve again. The window's
    # maintenance mode stopped the writers: the subflow did not switch it a second time.
    assert switch_log.read_text().split() == ["on", "off"]
    assert snapshot(mg_env["dsn"]) == before
    # The replaced database is kept, and the window's report names it.
    report = artifact_text("maintenance-teststack")
    assert f"kept as `{mg_env['database']}__old_" in report
    assert "swagger2mcp_ops.migration_runs" not in report


def test_window_refuses_before_anything_when_writers_cannot_be_stopped(monkeypatch, mg_env, alembic_env):
    use(monkeypatch, alembic_env([ADD_NAME]))
    before = snapshot(mg_env["dsn"])
    state = run_window(dry_run=False, approved=True)
    assert state.is_failed()
    with pytest.raises(Exception, match='writes_policy="keep-running"'):
        state.result()
    assert snapshot(mg_env["dsn"]) == before
    assert not (mg_env["tmp"] / "backups").exists()
    chosen = run_window(dry_run=False, approved=True, writes_policy="keep-running")
    assert chosen.is_completed(), chosen.message
    assert chosen.result()["migration"]["writers"]["policy"] == "keep-running"


def artifact_text(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(key={"any_": [key]}))
    assert found, f"no artifact {key}"
    return str(found[0].data)


def test_unrestored_failure_leaves_maintenance_mode_on(monkeypatch, mg_env, alembic_env, tmp_path: Path):
    use(monkeypatch, alembic_env([Revision("r1_ok", "fine", "op.execute('SELECT 1')")]))
    switch_log = tmp_path / "switch.log"
    switch = [sys.executable, "-c", f"import sys; open({str(switch_log)!r}, 'a').write(sys.argv[1] + '\\n')"]
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_ON_ARGV", json.dumps([*switch, "on"]))
    monkeypatch.setenv("OPS_MIGRATIONS__MAINTENANCE_OFF_ARGV", json.dumps([*switch, "off"]))
    # No migration; the post-maintenance smoke test fails: the app is not known-good, so it stays closed.
    monkeypatch.setenv("OPS_MIGRATIONS__SMOKE_QUERIES", '["SELECT count(*) FROM no_such_table"]')
    state = run_window(dry_run=False, approved=True, run_migrations=False)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"(?s)smoke tests failed.*still ON"):
        state.result()
    assert switch_log.read_text().split() == ["on"]
