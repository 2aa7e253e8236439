"""The runtime sections: Compose, Kubernetes, and the state every worker shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from tasks.settings.base import _Section

# The checkout's own var/ directory, absolute: `make run` from a checkout keeps its state where it
# always was, and a run started from another working directory finds the same release history.
# (This file is <checkout>/tasks/settings/runtime.py: three levels up is the checkout.)
DEFAULT_STATE_DIR = Path(__file__).resolve().parent.parent.parent / "var"


def _absolute_state_path(value: Path | None) -> Path | None:
    """Shared state must not depend on a worker's working directory: a relative path is refused."""
    if value is not None and not value.is_absolute():
        raise ValueError(
            "must be an absolute path: it holds state every worker shares (release history, image pins),"
            " and a relative path would point somewhere else for each working directory; give e.g."
            " /var/lib/swagger2mcp-ops (a directory every worker mounts at the same path)"
        )
    return value


class ComposeRuntimeSettings(_Section):
    """The Docker Compose project the services run in (``runtime.kind = "compose"``)."""

    project: str | None = Field(default=None, description="Compose project name; default: the stack name")
    files: list[Path] = Field(
        default_factory=lambda: [Path("docker-compose.yml")],
        min_length=1,
        description="Compose files, passed in order with --file (JSON list)",
        examples=[["docker-compose.yml", "docker-compose.production.yml"]],
    )
    env_file: Path | None = Field(
        default=None,
        description="Compose --env-file; also security-incident's default file of the app secrets",
    )
    project_directory: Path | None = Field(
        default=None, description="Compose --project-directory; None: the first Compose file's directory"
    )
    command: list[str] = Field(
        default_factory=lambda: ["docker", "compose"],
        min_length=1,
        description="the Compose v2 CLI (JSON list)",
    )
    docker_host: str | None = Field(default=None, description="DOCKER_HOST; default: the environment's")
    docker_config: Path | None = Field(default=None, description="DOCKER_CONFIG (where cli-plugins live)")
    images_file: Path | None = Field(
        default=None,
        description=(
            "Compose override file that pins each service's image (absolute); default beside the release"
            " records"
        ),
    )
    pull: Literal["missing", "never", "always"] = Field(
        default="missing", description="image pull policy of a deploy: `missing`, `never` or `always`"
    )
    stop_timeout_seconds: int = Field(
        default=10, ge=0, le=600, description="grace a container gets to stop on restart, seconds"
    )
    command_timeout_seconds: float = Field(
        default=300.0, gt=0, description="time limit of each docker compose command, seconds"
    )
    public_entry_services: list[str] = Field(
        default_factory=lambda: ["nginx"],
        description=(
            "services that take the traffic from outside (the reverse proxy), JSON list: security-incident's"
            " isolation stops them, end-isolation starts them again"
        ),
    )

    _absolute_images_file = field_validator("images_file")(_absolute_state_path)

    def docker_env(self) -> dict[str, str]:
        """The environment that points ``docker`` and ``docker compose`` at this Docker Engine:
        ``DOCKER_HOST`` and ``DOCKER_CONFIG`` where set (otherwise the process's own apply)."""
        env = {}
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        if self.docker_config:
            env["DOCKER_CONFIG"] = os.fspath(self.docker_config)
        return env


class KubernetesRuntimeSettings(_Section):
    """The Kubernetes namespace the services run in as Deployments (``runtime.kind = "kubernetes"``)."""

    namespace: str = Field(default="swagger2mcp", description="namespace of the application's Deployments")
    kubeconfig: Path | None = Field(
        default=None, description="kubeconfig file; None: in-cluster config, then ~/.kube/config"
    )
    context: str | None = Field(default=None, description="kubeconfig context; None: its current context")
    api_url: str | None = Field(
        default=None,
        description="API server URL; overrides the kubeconfig's",
        examples=["https://10.0.0.1:6443"],
    )
    token: SecretStr | None = Field(default=None, description="bearer token for the API server (secret)")
    verify_ssl: bool = Field(default=True, description="verify the API server's TLS certificate")
    request_timeout_seconds: float = Field(
        default=30.0, gt=0, description="timeout of each API request, seconds"
    )


class RuntimeSettings(_Section):
    """Where the application's services run, and how releases of them are recorded."""

    kind: Literal["compose", "kubernetes", "none"] = Field(
        default="none", description="where the services run: `compose`, `kubernetes` or `none` (not managed)"
    )
    services: list[str] = Field(
        default_factory=lambda: ["backend", "worker"],
        description="the application's Compose services or Deployments (JSON list)",
    )
    environment: str = Field(
        default="staging",
        description="the environment these settings point at, e.g. `staging` or `production`",
    )
    compose: ComposeRuntimeSettings = Field(default_factory=ComposeRuntimeSettings)
    kubernetes: KubernetesRuntimeSettings = Field(default_factory=KubernetesRuntimeSettings)
    state_dir: Path = Field(
        default=DEFAULT_STATE_DIR,
        description=(
            "absolute directory of the state every worker shares (release records, Compose image pins);"
            " default: the checkout's var/ directory. With several workers, a directory each of them"
            " mounts at the same path"
        ),
    )
    release_store: Path | None = Field(
        default=None,
        description="absolute directory of the durable release records; None: <state_dir>/releases",
    )
    migration_query: str | None = Field(
        default=None,
        description="SQL returning the applied migration revision when there is no alembic_version table",
        examples=["SELECT name FROM knex_migrations ORDER BY id DESC LIMIT 1"],
    )
    ready_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="how long a deploy, rollback or restart waits for ready services, seconds",
    )
    poll_interval_seconds: float = Field(
        default=2.0, gt=0, le=60, description="interval between readiness polls, seconds"
    )
    smoke_urls: list[str] = Field(
        default_factory=list,
        description="HTTP URLs that must answer 2xx after a deploy, rollback or restart (JSON list)",
        examples=[["https://api.example.com/api/specs"]],
    )
    lock_timeout_seconds: float = Field(
        default=0.0,
        ge=0,
        description=(
            "how long a deploy, rollback, uploads cleanup, FLUSHDB or secret rotation waits for another"
            " run of the same target before refusing (naming it), seconds; 0: refuse at once"
        ),
    )

    _absolute_state = field_validator("state_dir", "release_store")(_absolute_state_path)

    @field_validator("smoke_urls")
    @classmethod
    def _valid_smoke_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if urlsplit(url).scheme not in {"http", "https"}:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value

    @property
    def releases_dir(self) -> Path:
        """Where the release records (and by default the Compose image pins) live."""
        return self.release_store or self.state_dir / "releases"
