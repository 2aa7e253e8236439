"""The project's image, built for real from the Dockerfile (tests/fixtures/project_image.py): the flow
code imports, the tools the flows call are there (the PostgreSQL client of every major it declares,
and the choice of one by the server's major), it runs as a non-root user and carries no secret in a
layer. Its worker serving the docker pool, and stopping on SIGTERM: tests/integration/test_docker_pool.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.commands import run_command
from tests.fixtures.docker_engine import DockerEngine
from tests.fixtures.project_image import ProjectImage

pytestmark = [pytest.mark.integration, pytest.mark.long, pytest.mark.timeout(1800)]

SECRET_LIKE = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|AUTH_STRING|API_KEY|PRIVATE)[A-Z_]*=", re.I)


def docker(engine: DockerEngine, *args: str, timeout: float = 120, check: bool = True) -> str:
    return run_command(
        ["docker", *args], timeout=timeout, env=engine.env, check=check, log_output=False
    ).stdout


def in_image(engine: DockerEngine, image: ProjectImage, *argv: str) -> str:
    return docker(engine, "run", "--rm", "--network", "none", "--entrypoint", argv[0], image.tag, *argv[1:])


def test_image_runs_the_flows_as_a_non_root_user(
    docker_engine: DockerEngine, project_image: ProjectImage
) -> None:
    code = "import flows.health, flows.backup, flows.releases, deployments.serve; print('ok')"
    assert in_image(docker_engine, project_image, "python", "-c", code).strip() == "ok"
    assert in_image(docker_engine, project_image, "id", "-u").strip() not in {"", "0"}
    tools = in_image(
        docker_engine,
        project_image,
        "sh",
        "-c",
        "pg_dump --version && pg_restore --version && git --version && node --version && npm --version"
        " && certbot --version && prefect version | head -1",
    )
    assert "pg_dump (PostgreSQL)" in tools
    assert "git version" in tools
    assert "certbot" in tools
    # The locked versions, not whatever the index had: prefect as pinned.
    lock = (Path(__file__).resolve().parents[2] / "requirements.lock").read_text()
    pinned = re.search(r"^prefect==([^\s]+)", lock, re.M)
    assert pinned
    assert pinned.group(1) in tools
    config = json.loads(docker(docker_engine, "image", "inspect", project_image.tag))[0]["Config"]
    assert not config.get("Healthcheck")
    assert config["User"]
    assert not config["User"].startswith(("0", "root"))


def test_no_secret_in_the_image_history(docker_engine: DockerEngine, project_image: ProjectImage) -> None:
    history = docker(docker_engine, "history", "--no-trunc", "--format", "{{.CreatedBy}}", project_image.tag)
    assert "requirements.lock" in history  # the history is what we think it is
    assert not SECRET_LIKE.search(history), history
    config = json.loads(docker(docker_engine, "image", "inspect", project_image.tag))[0]["Config"]
    env = "\n".join(config.get("Env") or [])
    assert not SECRET_LIKE.search(env), env
    # No credentials file or env file got into the image.
    found = in_image(
        docker_engine,
        project_image,
        "sh",
        "-c",
        "find /app /home/ops -name '*.env' -o -name 'ops.toml' -o -name '.netrc' -o -name 'profiles.toml'",
    )
    assert found.strip() == ""


CHOOSE = """
import json, sys
from tasks.pgtools import ClientTooOld, choose_client, installed_majors
majors = list(installed_majors("pg_dump"))
out = {"majors": majors, "chosen": {}}
for major in majors:
    out["chosen"][major] = [choose_client(t, t, major).path for t in ("pg_dump", "pg_restore")]
try:
    choose_client("pg_dump", "pg_dump", max(majors) + 1)
except ClientTooOld as exc:
    out["refused"] = str(exc)
print(json.dumps(out))
"""


def test_the_client_of_each_declared_postgres_major_and_the_choice_by_server_major(
    docker_engine: DockerEngine, project_image: ProjectImage
) -> None:
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    declared = re.search(r"^ARG POSTGRES_MAJORS=\"?([\d ]+)\"?$", dockerfile, re.M)
    assert declared
    majors = [int(m) for m in declared.group(1).split()]
    found = json.loads(in_image(docker_engine, project_image, "python", "-c", CHOOSE))
    assert found["majors"] == majors
    versions = in_image(
        docker_engine,
        project_image,
        "sh",
        "-c",
        "for bin in /usr/lib/postgresql/*/bin; do $bin/pg_dump --version; $bin/pg_restore --version; done",
    )
    for major in majors:
        assert f"pg_dump (PostgreSQL) {major}." in versions
        assert f"pg_restore (PostgreSQL) {major}." in versions
        assert found["chosen"][str(major)] == [
            f"/usr/lib/postgresql/{major}/bin/pg_dump",
            f"/usr/lib/postgresql/{major}/bin/pg_restore",
        ]
    newer = max(majors) + 1
    assert found["refused"].startswith(f"the PostgreSQL {newer} server needs pg_dump {newer} or newer")
    assert f"postgresql-client-{newer}" in found["refused"]
