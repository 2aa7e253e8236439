"""The incidents section."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from tasks.settings.base import _Section


class IncidentsSettings(_Section):
    """Emergency procedures: outage triage, data recovery, security incidents, Redis out of memory."""

    release_window_hours: float = Field(
        default=2.0, gt=0, description="a release this recent makes outage-triage propose a rollback, hours"
    )
    stop_services: list[str] | None = Field(
        default=None,
        description="services recover-data scales to 0 and back (JSON list); default runtime.services",
    )
    validation_queries: list[str] = Field(
        default_factory=list,
        description=(
            "read-only SQL run after a recovery; an error, no row, or a false/NULL/0 first column fails"
        ),
        examples=[["SELECT count(*) > 0 FROM users"]],
    )
    validation_timeout_seconds: float = Field(
        default=60.0, gt=0, description="time limit of each validation query, seconds"
    )
    approval_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="how long the incident flows wait for approval, seconds"
    )
    evidence_prefix: str = Field(default="incidents", description="storage prefix of evidence bundles")
    evidence_log_lines: int = Field(
        default=5000, ge=0, le=1_000_000, description="log lines per service in an evidence bundle"
    )
    rotate_roles: list[str] = Field(
        default_factory=list,
        description="PostgreSQL roles whose password security-incident rotates (JSON list)",
        examples=[["swagger2mcp"]],
    )
    role_secret_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "app secret keys carrying each rotated role's password (JSON map role -> keys); a URL value"
            " gets its password replaced, any other is replaced whole"
        ),
        examples=[{"swagger2mcp": ["DATABASE_URL"]}],
    )
    app_secrets: list[str] = Field(
        default_factory=list,
        description="app secret keys regenerated with random values on rotation (JSON list)",
        examples=[["JWT_SECRET"]],
    )
    secret_bytes: int = Field(default=32, ge=16, le=128, description="random bytes per generated secret")
    compose_env_file: Path | None = Field(
        default=None,
        description="env file holding the app secrets (Compose); default runtime.compose.env_file",
    )
    kubernetes_secret: str | None = Field(
        default=None,
        description="Kubernetes Secret (in runtime.kubernetes.namespace) holding the app secrets",
    )
    restart_services: list[str] | None = Field(
        default=None, description="services restarted after a rotation (JSON list); default runtime.services"
    )
    key_census_depth: int = Field(
        default=2, ge=1, le=5, description="flush-redis key census: name segments ('a:b:...') grouped"
    )
    key_census_max_keys: int = Field(
        default=1_000_000, ge=1, description="flush-redis key census: keys SCAN reads at most"
    )
    scan_count: int = Field(default=1000, ge=10, le=100_000, description="SCAN COUNT hint of the key census")

    @field_validator("rotate_roles")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        for role in value:
            if not role or len(role) > 63 or "\x00" in role:
                raise ValueError(f"{role!r} is not a PostgreSQL role name")
        return value

    @field_validator("app_secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        import re

        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
                raise ValueError(f"{name!r} is not an environment variable / Secret key name")
        return value

    @field_validator("evidence_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or ".." in value.split("/") or "\\" in value:
            raise ValueError("must be a relative storage prefix such as 'incidents'")
        return value.strip("/")

    @model_validator(mode="after")
    def _keys_of_rotated_roles(self) -> IncidentsSettings:
        import re

        for role, keys in self.role_secret_keys.items():
            if role not in self.rotate_roles:
                raise ValueError(f"role_secret_keys names role {role!r}, which is not in rotate_roles")
            for key in keys:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
                    raise ValueError(f"{key!r} is not an environment variable / Secret key name")
                if key in self.app_secrets:
                    raise ValueError(
                        f"{key!r} is both an app secret and a carrier of role {role!r}'s password"
                    )
        return self
