"""The migrations section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from tasks.settings.base import _Section


class MigrationsSettings(_Section):
    """Schema migrations: the tool (Alembic in-process or any migration CLI), smoke queries, the lock,
    timeouts, and the application's maintenance mode used by the scheduled-downtime flow."""

    tool: Literal["alembic", "command"] = Field(
        default="alembic", description="`alembic` (in-process) or `command` (a migration CLI such as Prisma)"
    )
    alembic_config: Path | None = Field(
        default=None, description="the app's alembic.ini; None: no file, script_location alone"
    )
    script_location: str | None = Field(
        default=None,
        description="directory of the app's Alembic environment (env.py, versions/)",
        examples=["/srv/backend/alembic"],
    )
    status_argv: list[str] = Field(
        default_factory=list,
        description="command tool: prints the status (JSON list), e.g. npx prisma migrate status",
        examples=[["npx", "prisma", "migrate", "status"]],
    )
    apply_argv: list[str] = Field(
        default_factory=list,
        description="command tool: applies the migrations (JSON list), e.g. npx prisma migrate deploy",
        examples=[["npx", "prisma", "migrate", "deploy"]],
    )
    apply_target_argv: list[str] = Field(
        default_factory=list,
        description="command tool: applies up to a target the run names, '{target}' standing for it"
        " (e.g. npx node-pg-migrate up {target}); empty: the tool takes no target",
    )
    up_to_date_pattern: str | None = Field(
        default=None,
        description="command tool: regular expression the status output matches when nothing is pending",
        examples=["Database schema is up to date"],
    )
    cwd: Path | None = Field(default=None, description="command tool: working directory (the backend)")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="command tool: extra environment (JSON map)",
        examples=[{"NODE_ENV": "production"}],
    )
    database_url_env: str | None = Field(
        default="DATABASE_URL", description="command tool: variable that gets the database DSN (masked)"
    )
    smoke_queries: list[str] = Field(
        default_factory=list,
        description="read-only SQL run after migrating (JSON list); an error or no row fails",
        examples=[["SELECT 1 FROM users LIMIT 1"]],
    )
    lock_key: str | None = Field(
        default=None, description="advisory lock name of a migration; None: swagger2mcp-ops:migrate:<db>"
    )
    lock_timeout_seconds: float = Field(
        default=60.0, ge=0, description="how long a second migration run waits for the lock, seconds"
    )
    apply_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="time limit of applying the migrations, seconds"
    )
    status_timeout_seconds: float = Field(
        default=120.0, gt=0, description="command tool: time limit of the status command, seconds"
    )
    smoke_timeout_seconds: float = Field(
        default=30.0, gt=0, description="time limit of each smoke query, seconds"
    )
    approval_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="how long migrate-database waits for approval, seconds"
    )
    runs_schema: str = Field(
        default="swagger2mcp_ops", description="schema of the migration_runs table (in the app's database)"
    )
    maintenance_on_argv: list[str] = Field(
        default_factory=list,
        description="command turning the app's maintenance mode on (JSON list)",
        examples=[["docker", "compose", "exec", "-T", "backend", "touch", "/app/maintenance"]],
    )
    maintenance_off_argv: list[str] = Field(
        default_factory=list,
        description="command turning maintenance mode off (JSON list)",
        examples=[["docker", "compose", "exec", "-T", "backend", "rm", "-f", "/app/maintenance"]],
    )
    maintenance_on_url: str | None = Field(
        default=None,
        description="http(s) endpoint turning maintenance mode on",
        examples=["http://127.0.0.1:3000/admin/maintenance/on"],
    )
    maintenance_off_url: str | None = Field(
        default=None,
        description="http(s) endpoint turning maintenance mode off",
        examples=["http://127.0.0.1:3000/admin/maintenance/off"],
    )
    maintenance_http_method: Literal["POST", "PUT", "DELETE", "GET"] = Field(
        default="POST", description="HTTP method of the maintenance URLs: `POST`, `PUT`, `DELETE` or `GET`"
    )
    maintenance_timeout_seconds: float = Field(
        default=60.0, gt=0, description="time limit of each maintenance command or request, seconds"
    )

    @field_validator("runs_schema")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not value or not (value[0].isalpha() or value[0] == "_") or not value.replace("_", "a").isalnum():
            raise ValueError("must be a plain SQL identifier (letters, digits, '_')")
        return value

    @field_validator("up_to_date_pattern")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"is not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _tool_complete(self) -> MigrationsSettings:
        if self.tool == "command":
            missing = [
                name
                for name in ("status_argv", "apply_argv", "up_to_date_pattern")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"tool 'command' needs {', '.join(missing)}")
        if (self.maintenance_on_argv or self.maintenance_on_url) and not (
            self.maintenance_off_argv or self.maintenance_off_url
        ):
            raise ValueError("maintenance mode can be turned on but not off: set maintenance_off_*")
        for url in (self.maintenance_on_url, self.maintenance_off_url):
            if url is not None and urlsplit(url).scheme not in {"http", "https"}:
                raise ValueError("maintenance URLs must be http(s) URLs")
        return self
