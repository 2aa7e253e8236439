"""The docker work pool for real, as the README's Production section runs it: a Prefect server, the
pool, the prefect-docker worker in the project's image (the Docker socket mounted, as
deploy/compose/compose.yaml runs it), `deployments.pools docker --job-variables` and `prefect deploy`;
health-check and backup-database then run as containers of the image against the test PostgreSQL
and Redis, and the backup is restored from the host with the project's own code. The worker stops on
SIGTERM within `docker stop`'s 10 s grace."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tasks.commands import run_command
from tests.fixtures.docker_engine import DockerEngine
from tests.fixtures.prefect_server import PREFECT, PrefectServer
from tests.fixtures.project_image import ProjectImage

pytestmark = [pytest.mark.integration, pytest.mark.long, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
POOL = "swagger2mcp-ops-docker"  # prefect.yaml's definitions.work_pools.docker
DEPLOYMENTS = ("health-check/every-5-minutes", "backup-database/nightly")
# Where the job variables mount the host's directories in a flow run's container.
BACKUPS_IN_CONTAINER = "/var/lib/swagger2mcp-ops/backups"
UPLOADS_IN_CONTAINER = "/srv/uploads"
CONFIG_IN_CONTAINER = "/etc/swagger2mcp-ops/ops.toml"
IMAGE_UID = 10001


def docker(engine: DockerEngine, *args: str, timeout: float = 120, check: bool = True) -> str:
    return run_command(
        ["docker", *args], timeout=timeout, env=engine.env, check=check, log_output=False
    ).stdout


def prefect_cli(server: PrefectServer, home: Path, *args: str, timeout: float = 300) -> str:
    return run_command(
        [PREFECT, "--no-prompt", *args],
        timeout=timeout,
        cwd=ROOT,
        env=server.client_env(home),
        log_output=False,
    ).stdout


@dataclass
class PoolWorker:
    """The prefect-docker worker container serving the docker pool on the test engine."""

    engine: DockerEngine
    container: str
    home: Path

    def logs(self) -> str:
        return docker(self.engine, "logs", self.container, check=False)


@pytest.fixture(scope="module")
def pool_worker(
    docker_engine: DockerEngine,
    project_image: ProjectImage,
    prefect_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PoolWorker]:
    """The docker pool on the session's server and its worker: the image's own entrypoint (tini) and
    the command deploy/compose/compose.yaml gives it, uid 10001 with the socket's group."""
    home = tmp_path_factory.mktemp("pool-cli-home")
    prefect_cli(prefect_server, home, "work-pool", "create", POOL, "--type", "docker", "--overwrite")
    socket = docker_engine.host.removeprefix("unix://")
    name = f"s2m-pool-worker-{uuid.uuid4().hex[:8]}"
    docker(
        docker_engine,
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--user",
        f"{IMAGE_UID}:{os.stat(socket).st_gid}",
        "--volume",
        f"{socket}:/var/run/docker.sock",
        "--env",
        f"PREFECT_API_URL={prefect_server.api_url}",
        project_image.tag,
        "prefect",
        "worker",
        "start",
        "--pool",
        POOL,
        "--type",
        "docker",
    )
    worker = PoolWorker(engine=docker_engine, container=name, home=home)
    try:
        deadline = time.monotonic() + 180
        while "started!" not in (logs := worker.logs()):
            state = docker(docker_engine, "inspect", "--format", "{{.State.Status}}", name)
            assert state.strip() == "running", f"the worker exited:\n{logs[-3000:]}"
            assert time.monotonic() < deadline, f"the worker did not start:\n{logs[-3000:]}"
            time.sleep(1)
        yield worker
    finally:
        docker(docker_engine, "rm", "--force", name, check=False)


def job_variables(ops: dict[str, Any], image: str, tmp: Path) -> dict[str, Any]:
    """The job variables of a host whose PostgreSQL and Redis listen on the host (no bridge here);
    the connection URLs come from a settings file mounted read-only, not from the job variables."""
    config = tmp / "ops.toml"
    config.write_text(f'[postgres]\ndsn = "{ops["dsn"]}"\n\n[redis]\nurl = "{ops["redis_url"]}"\n')
    config.chmod(0o600)
    os.chown(config, IMAGE_UID, IMAGE_UID)
    kept = {"OPS_STACK", "OPS_RUNTIME__KIND", "OPS_HEALTH__TIMEOUT_SECONDS"}
    kept.add("OPS_RUNTIME__LOCK_TIMEOUT_SECONDS")
    return {
        "image": image,
        "image_pull_policy": "Never",
        "networks": [],
        "network_mode": "host",
        "volumes": [
            f"{tmp / 'backups'}:{BACKUPS_IN_CONTAINER}",
            f"{tmp / 'uploads'}:{UPLOADS_IN_CONTAINER}",
            f"{config}:{CONFIG_IN_CONTAINER}:ro",
        ],
        "env": {
            **{k: v for k, v in ops["env"].items() if k in kept},
            "OPS_CONFIG": CONFIG_IN_CONTAINER,
            "OPS_STORAGE__URL": f"file://{BACKUPS_IN_CONTAINER}",
            "OPS_UPLOADS__ROOT": UPLOADS_IN_CONTAINER,
        },
    }


def wait_final(server: PrefectServer, run_ids: dict[str, str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    runs: dict[str, dict[str, Any]] = {}
    while True:
        for name, run_id in run_ids.items():
            runs[name] = httpx.get(f"{server.api_url}/flow_runs/{run_id}", timeout=10).json()
        final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
        if all(run["state"]["type"] in final for run in runs.values()) or time.monotonic() > deadline:
            return runs
        time.sleep(2)


def run_logs(server: PrefectServer, run_id: str) -> str:
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    logs = httpx.post(f"{server.api_url}/logs/filter", json=body, timeout=10).json()
    return "\n".join(entry["message"] for entry in logs)


def test_health_check_and_backup_run_as_containers_of_the_docker_pool(
    pool_worker: PoolWorker,
    project_image: ProjectImage,
    prefect_server: PrefectServer,
    ops_env: dict[str, Any],
    tmp_path: Path,
) -> None:
    with psycopg.connect(ops_env["dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes (body) SELECT 'note ' || g FROM generate_series(1, 50) g")
    backups = tmp_path / "backups"
    for directory in (backups, tmp_path / "uploads"):
        directory.mkdir()
        os.chown(directory, IMAGE_UID, IMAGE_UID)  # the image's user writes there

    # The README's commands: the per-pool file with this host's job variables, then deploy.
    variables = tmp_path / "job-variables.yaml"
    variables.write_text(yaml.safe_dump(job_variables(ops_env, project_image.tag, tmp_path)))
    generated = tmp_path / "prefect.docker.yaml"
    run_command(
        [sys.executable, "-m", "deployments.pools", "docker", "--image", project_image.tag,
         "--job-variables", str(variables), "--output", str(generated)],
        timeout=60,
        cwd=ROOT,
    )  # fmt: skip
    names = [arg for deployment in DEPLOYMENTS for arg in ("--name", deployment)]
    prefect_cli(prefect_server, pool_worker.home, "deploy", "--prefect-file", str(generated), *names)

    # No connection URL reached the server: the runs read them from the mounted file.
    for deployment in DEPLOYMENTS:
        stored = httpx.get(f"{prefect_server.api_url}/deployments/name/{deployment}", timeout=10).json()
        assert stored["work_pool_name"] == POOL
        assert "postgresql://" not in json.dumps(stored["job_variables"])
        assert stored["job_variables"]["network_mode"] == "host"

    run_ids: dict[str, str] = {}
    for deployment in DEPLOYMENTS:
        out = prefect_cli(prefect_server, pool_worker.home, "deployment", "run", deployment)
        found = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert found, out
        run_ids[deployment] = found.group(1)
    runs = wait_final(prefect_server, run_ids, timeout=600)
    for deployment, run in runs.items():
        assert run["state"]["type"] == "COMPLETED", (
            f"{deployment}: {run['state']}\n{run_logs(prefect_server, run['id'])}\n"
            f"worker:\n{pool_worker.logs()[-4000:]}"
        )
        # Run by this pool's worker in a container of its engine (the worker records the container).
        assert run["work_pool_name"] == POOL
        assert re.fullmatch(r".+:[0-9a-f]{64}", run["infrastructure_pid"]), run["infrastructure_pid"]

    # The backup's manifest is in storage, written by the image's user.
    manifests = sorted(backups.rglob("*.json"))
    assert manifests, sorted(str(p) for p in backups.rglob("*"))
    assert {p.stat().st_uid for p in manifests} == {IMAGE_UID}
    from tasks.backup import list_backups, verify_backup
    from tasks.settings import load_settings

    settings = load_settings()  # the host's view: OPS_STORAGE__URL is the mounted directory
    listed = list_backups(settings, ops_env["database"])
    assert len(listed) == 1
    manifest = listed[0]
    assert manifest.tables["public.notes"].rows == 50
    # The image dumped with the pg_dump of the server's major, and its own restore drill passed.
    with psycopg.connect(ops_env["dsn"]) as conn:
        server = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    assert f"(PostgreSQL) {server.split('.')[0]}." in manifest.pg_dump_version
    assert [(v.level, v.ok) for v in manifest.verifications] == [("restore", True)]
    # And it restores here, with the host's tools, compared table by table with the manifest.
    verification = verify_backup(settings, manifest.id, "restore")
    assert verification.ok, verification.detail

    # The reports are on the server as artifacts of those runs.
    for deployment, key in zip(DEPLOYMENTS, ("health-teststack", "backup-teststack"), strict=True):
        body = {"artifacts": {"flow_run_id": {"any_": [run_ids[deployment]]}}}
        artifacts = httpx.post(f"{prefect_server.api_url}/artifacts/filter", json=body, timeout=10).json()
        assert key in {a["key"] for a in artifacts}, json.dumps([a["key"] for a in artifacts])


def test_the_worker_container_stops_on_sigterm_within_the_grace(pool_worker: PoolWorker) -> None:
    # `docker stop -t 10`: SIGTERM, then SIGKILL once 10 s have passed; a worker still running then
    # would end killed (exit 137) and leave no shutdown in its log.
    docker(pool_worker.engine, "stop", "--time", "10", pool_worker.container, timeout=60)
    inspected = docker(pool_worker.engine, "inspect", "--format", "{{json .State}}", pool_worker.container)
    state = json.loads(inspected)
    logs = pool_worker.logs()
    assert state["Status"] == "exited"
    assert not state["OOMKilled"]
    assert state["ExitCode"] != 137, f"killed after the grace: {state}\n{logs[-3000:]}"
