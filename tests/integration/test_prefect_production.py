"""Prefect itself as production runs it: the Compose layout's server (deploy/compose/compose.yaml) on
PostgreSQL with API authentication, prefect.yaml's process pool, and process workers in working
directories of their own (tests/fixtures/prefect_production.py runs them as plain processes).

- 20 runs started at once on the PostgreSQL-backed server all complete;
- two workers (two checkouts, one shared state directory) share the runs, the release history and the
  environment's lock: a deploy started while a rollback on the other worker holds staging waits for
  it, naming it, and the two never hold the environment at the same time (Kubernetes emulator);
- the server refuses calls and workers without the layout's credentials.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tasks import locks
from tasks.releases import ReleaseStore
from tasks.settings import load_settings
from tests.fixtures.core import pg_dsn
from tests.fixtures.kube import IMAGE_REPO
from tests.fixtures.prefect_production import FINAL_STATES, POOL, ROOT, LayoutServer, stop_process
from tests.fixtures.prefect_server import PREFECT

pytestmark = [pytest.mark.integration, pytest.mark.long, pytest.mark.timeout(900)]

PROBE_DEPLOYMENT = """\
name: swagger2mcp-ops-probe
prefect-version: 3.9.1
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{ $SWAGGER2MCP_OPS_HOME }}"
deployments:
  - name: at-once
    entrypoint: tests/integration/production_flows.py:production_probe
    work_pool:
      name: %s
      job_variables:
        env:
          PREFECT_TASKS_DEFAULT_NO_CACHE: "true"
"""


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _most_at_once(runs: list[dict[str, Any]]) -> int:
    """The largest number of runs that were running at one moment (by the server's start/end times)."""
    events = sorted(
        [(_time(r["start_time"]), 1) for r in runs] + [(_time(r["end_time"]), -1) for r in runs],
        key=lambda e: (e[0], e[1]),
    )
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_twenty_runs_at_once_complete_on_the_postgresql_server(
    layout_server: LayoutServer, start_worker, tmp_path: Path
) -> None:
    probe = tmp_path / "prefect.probe.yaml"
    probe.write_text(PROBE_DEPLOYMENT % POOL)
    worker = start_worker("ops-pg-worker", tmp_path / "worker", limit=20, wait=False)
    layout_server.cli("deploy", "--all", "--prefect-file", str(probe))
    worker.wait_started()

    ids = [
        layout_server.run_deployment("production-probe/at-once", {"number": n, "seconds": 1})
        for n in range(20)
    ]
    runs = layout_server.wait_runs(ids, timeout=480)

    states = {r["name"]: r["state"]["type"] for r in runs}
    assert set(states.values()) == {"COMPLETED"}, (states, worker.log_tail())
    assert {r["labels"]["prefect.worker.name"] for r in runs} == {"ops-pg-worker"}
    # They ran side by side, not one after the other (the SQLite server locks under this).
    assert _most_at_once(runs) >= 2
    # The server keeps them in PostgreSQL.
    with psycopg.connect(pg_dsn(layout_server.database)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM flow_run WHERE id = ANY(%s::uuid[]) AND state_type = 'COMPLETED'", (ids,)
        ).fetchone()
    assert row == (20,)


def _lock_window(server: LayoutServer, flow_run_id: str, lock: str) -> tuple[datetime, datetime]:
    """When the run logged that it holds ``lock``, and when that it releases it."""
    held = server.wait_log(flow_run_id, f"holding lock {lock} ")
    released = server.wait_log(flow_run_id, f"releasing lock {lock}")
    return _time(held["timestamp"]), _time(released["timestamp"])


def _served_version(url: str) -> str:
    response = httpx.get(url, timeout=5)
    return f"{response.status_code} {response.json().get('version')}"


def _second_checkout(tmp_path: Path) -> Path:
    """A copy of the checkout, as a second host has its own (its default state dir is its own var/)."""
    home = tmp_path / "host-b" / "swagger2mcp-ops"
    shutil.copytree(
        ROOT,
        home,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "var", "__pycache__", "node_modules", ".*_cache", "bench"
        ),
    )
    return home


def test_two_workers_share_the_runs_the_release_history_and_the_environment_lock(
    layout_server: LayoutServer,
    start_worker,
    ops_env: dict[str, Any],
    kube_stack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state_dir = tmp_path / "shared-state"
    settings_env = {
        **ops_env["env"],
        # A stack name of this test alone: the release lock lives on the shared PostgreSQL.
        "OPS_STACK": f"pgprod{uuid.uuid4().hex[:8]}",
        "OPS_RUNTIME__STATE_DIR": str(state_dir),
        "OPS_RUNTIME__LOCK_TIMEOUT_SECONDS": "240",
        "OPS_RUNTIME__KIND": "kubernetes",
        "OPS_RUNTIME__KUBERNETES__API_URL": kube_stack.url,
        "OPS_RUNTIME__KUBERNETES__NAMESPACE": kube_stack.namespace,
        "OPS_RUNTIME__READY_TIMEOUT_SECONDS": "30",
        "OPS_RUNTIME__POLL_INTERVAL_SECONDS": "0.2",
        "OPS_HEALTH__URLS": json.dumps([kube_stack.health_url]),
    }
    host_b = _second_checkout(tmp_path)
    # One run at a time each: a run that holds one worker goes to the other.
    workers = [
        start_worker("ops-host-a", tmp_path / "host-a" / "cwd", limit=1, env=settings_env, wait=False),
        start_worker(
            "ops-host-b", tmp_path / "host-b" / "cwd", ops_home=host_b, limit=1, env=settings_env, wait=False
        ),
    ]
    layout_server.cli("deploy", "--name", "deploy-release/staging", "--name", "rollback-release/by-hand")
    for worker in workers:
        worker.wait_started()

    # As CI deploys: --watch exits 0 only when the run completed.
    started = layout_server.cli(
        "deployment",
        "run",
        "deploy-release/staging",
        "-p",
        "image_tag=v3",
        "-p",
        "timeout_seconds=60",
        "--watch",
        "--watch-timeout",
        "300",
    )
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)
    assert run_id is not None, started.stdout
    first = run_id.group(1)
    assert _served_version(kube_stack.health_url) == "200 v3"

    # An operator's rollback takes staging and waits on its approval form, holding the lock...
    rollback = layout_server.run_deployment("rollback-release/by-hand", {"timeout_seconds": 60})
    layout_server.wait_runs([rollback], states={"PAUSED", *FINAL_STATES}, timeout=240)
    # ...when CI deploys again: the deploy runs on the other worker and waits, naming the rollback.
    deploy = layout_server.run_deployment(
        "deploy-release/staging", {"image_tag": "v3", "timeout_seconds": 60}
    )
    waiting = layout_server.wait_log(deploy, "waiting up to 240")
    [paused] = layout_server.flow_runs([rollback])
    assert paused["state"]["type"] == "PAUSED"
    assert f"flow run {paused['name']!r} (id {rollback})" in waiting["message"]
    assert "of rollback-release" in waiting["message"]

    resumed = layout_server.api(
        "POST",
        f"/flow_runs/{rollback}/resume",
        json={
            "run_input": {"approve": True, "approver": "ops-test", "reason": "rolled back by the race test"}
        },
    )
    assert resumed.status_code == 201, resumed.text
    runs = {r["id"]: r for r in layout_server.wait_runs([rollback, deploy], timeout=300)}
    assert {r["state"]["type"] for r in runs.values()} == {"COMPLETED"}, [
        line["message"] for i in runs for line in layout_server.logs(i)[-5:]
    ]

    # Spread over both workers, each named on its run.
    ran_on = {i: r["labels"]["prefect.worker.name"] for i, r in runs.items()}
    assert set(ran_on.values()) == {"ops-host-a", "ops-host-b"}, ran_on

    # The environment's exclusive part never ran twice at once: the deploy's began after the
    # rollback's ended (both windows as the runs logged them).
    monkeypatch.setenv("OPS_STACK", settings_env["OPS_STACK"])
    lock = locks.release_lock_name(load_settings(), "staging")
    rollback_window = _lock_window(layout_server, rollback, lock)
    deploy_window = _lock_window(layout_server, deploy, lock)
    assert rollback_window[1] <= deploy_window[0], (rollback_window, deploy_window)

    # One release history whichever worker wrote it: the deploy on one worker returned from the
    # rollback that the other worker recorded.
    history = ReleaseStore(state_dir / "releases", "staging").all()
    v1, v3 = (
        {s: f"{IMAGE_REPO}:v1" for s in ("backend", "worker")},
        {s: f"{IMAGE_REPO}:v3" for s in ("backend", "worker")},
    )
    assert [(r.kind, r.status, r.images, r.flow_run_id) for r in history] == [
        ("baseline", "recorded", v1, first),
        ("deploy", "succeeded", v3, first),
        ("rollback", "succeeded", v1, rollback),
        ("deploy", "succeeded", v3, deploy),
    ]
    assert history[2].previous_id == history[0].id
    assert history[3].previous_id == history[2].id
    assert _served_version(kube_stack.health_url) == "200 v3"
    # Nothing went to the second checkout's own default state directory.
    assert not (host_b / "var").exists()


def test_the_api_and_workers_need_the_layouts_credentials(
    layout_server: LayoutServer, start_worker, tmp_path: Path
) -> None:
    user, _, password = layout_server.auth_string.partition(":")
    for path in ("/flow_runs/filter", "/deployments/filter", "/work_pools/filter"):
        assert layout_server.api("POST", path, auth=False, json={}).status_code == 401, path
        wrong = httpx.post(
            f"{layout_server.api_url}{path}", json={}, auth=(user, "not-the-password"), timeout=60
        )
        assert wrong.status_code == 401, path
        assert layout_server.api("POST", path, json={}).status_code == 200, path

    # A worker without the credentials, or with wrong ones, cannot even read its pool: it stops.
    attempts = {}
    for name, credentials in (
        ("no-credentials", None),
        ("wrong-credentials", f"{user}:wrong-{password[:4]}x"),
    ):
        env = layout_server.client_env(tmp_path / name, credentials=False)
        if credentials:
            env["PREFECT_API_AUTH_STRING"] = credentials
        attempts[name] = (
            credentials,
            subprocess.Popen(  # both at once; each ends by itself (communicate's timeout bounds it)
                [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--name", name],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            ),
        )
    for name, (credentials, proc) in attempts.items():
        try:
            output, _ = proc.communicate(timeout=180)
        finally:
            stop_process(proc)
        assert proc.returncode != 0, (name, output[-3000:])
        assert "401 Unauthorized" in output, (name, output[-3000:])
        if credentials:
            assert credentials not in output

    start_worker("with-credentials", tmp_path / "with-credentials", limit=1)
    listed = layout_server.api("POST", f"/work_pools/{POOL}/workers/filter", json={})
    assert listed.status_code == 200, listed.text
    names = {w["name"]: w["status"] for w in listed.json()}
    assert names.get("with-credentials") == "ONLINE", names
    assert "no-credentials" not in names
    assert "wrong-credentials" not in names
