"""The dependencies section."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from tasks.settings.base import _Section


class DependenciesSettings(_Section):
    """Dependency updates of the application: its source, where updates are made, registry, build."""

    source_dir: Path = Field(
        default=Path("."), description="the application's live checkout (package.json); never modified"
    )
    work_dir: Path = Field(
        default=Path("./var/dependencies"), description="where working copies of the source are made"
    )
    keep_working_copies: int = Field(
        default=5,
        ge=1,
        description=(
            "run directories (working copy with node_modules) kept in work_dir, newest first; each run"
            " removes the older ones it made (marked .swagger2mcp-ops-run), never one in use or anything"
            " else"
        ),
    )
    registry_url: str | None = Field(
        default=None,
        description="npm registry URL; default: the project's own .npmrc or npm's default",
        examples=["https://registry.npmjs.org/"],
    )
    registry_token: SecretStr | None = Field(default=None, description="auth token for registry_url (secret)")
    npm_cache_dir: Path | None = Field(default=None, description="npm cache; default: npm's (~/.npm)")
    test_argv: list[str] = Field(
        default_factory=lambda: ["npm", "test"],
        min_length=1,
        description="the app's test command, run in the working copy (JSON list)",
        examples=[["npm", "run", "test:ci"]],
    )
    build_argv: list[str] | None = Field(
        default=None,
        description=(
            "image build command (JSON list; {image}, {tag}, {ref}, {context} filled in, IMAGE_NAME and"
            " IMAGE_TAG set); default docker build -t {ref} {context}"
        ),
        examples=[["docker", "compose", "-f", "docker-compose.production.yml", "build"]],
    )
    image_name: str = Field(default="swagger2mcp-backend", description="repository of the built image")
    install_timeout_seconds: float = Field(
        default=600.0, gt=0, description="time limit of each npm ci / install / update, seconds"
    )
    audit_timeout_seconds: float = Field(
        default=120.0, gt=0, description="time limit of each npm audit / outdated / view, seconds"
    )
    test_timeout_seconds: float = Field(
        default=900.0, gt=0, description="time limit of the test command, seconds"
    )
    build_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="time limit of the image build, seconds"
    )
    git_timeout_seconds: float = Field(
        default=60.0, gt=0, description="time limit of each git command, seconds"
    )
    git_author_name: str = Field(default="swagger2mcp-ops", description="author name of the update commits")
    git_author_email: str = Field(
        default="swagger2mcp-ops@localhost", description="author e-mail of the update commits"
    )
    branch_prefix: str = Field(default="deps/", description="update branches: <prefix><scope>-<time>")

    @field_validator("registry_url")
    @classmethod
    def _valid_registry(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in {"http", "https"}:
            raise ValueError("must be an http(s) URL such as https://registry.npmjs.org/")
        return value

    @field_validator("build_argv")
    @classmethod
    def _valid_build_argv(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("must name a program and its arguments, e.g. ['docker', 'compose', 'build']")
        return value
