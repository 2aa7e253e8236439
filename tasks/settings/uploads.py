"""The uploads section: the application's uploads directory, its owner and mode, and what it must never be."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from tasks.settings.base import _Section


class UploadsSettings(_Section):
    """The application's uploads directory."""

    root: Path = Field(
        default=Path("./var/uploads"),
        description=(
            "the application's uploads directory; never /, a system directory or its ancestor, the home or"
            " project directory, a symlink, or one holding the quarantine, backups or plans"
        ),
    )
    expected_owner: str | None = Field(
        default=None,
        description="user (name or uid) that must own the uploads root; cleanup and restore refuse any other",
        examples=["node"],
    )
    expected_mode: str | None = Field(
        default=None,
        description="octal mode the uploads root must have; a mismatch is reported",
        examples=["0755"],
    )
    protect: list[str] = Field(
        default_factory=lambda: [".gitkeep", "keep/**"],
        description=(
            "patterns cleanup never removes (JSON list): a name alone matches at any depth, one with '/'"
            " the root-relative path; '**' crosses directories"
        ),
        examples=[[".gitkeep", "keep/**", "avatars/default.png"]],
    )
    reference_query: str | None = Field(
        default=None,
        description=(
            "read-only SQL whose first column lists the uploads the app still references, which are kept"
            " (an index on it is used); None: no database check"
        ),
        examples=["SELECT path FROM uploads"],
    )
    reference_prefix: str | None = Field(
        default=None,
        description=(
            "what the app stores before the root-relative path, e.g. 'uploads/'; a stored value matches"
            " as path or prefix + path"
        ),
        examples=["uploads/"],
    )
    quarantine_dir: Path | None = Field(
        default=None,
        description="quarantine directory (on the root's filesystem); None: <root>/../.uploads-quarantine",
    )
    quarantine_retention_days: int = Field(
        default=14,
        ge=1,
        description="days quarantine runs and plans are kept before they are purged (at least 1)",
    )
    cross_filesystem: bool = Field(
        default=False, description="also scan directories mounted from another filesystem below the root"
    )
    plan_dir: Path | None = Field(
        default=None,
        description="plan directory (JSON Lines); None: uploads-plans in file storage, else in state_dir",
    )

    @field_validator("expected_mode")
    @classmethod
    def _octal_mode(cls, value: str | None) -> str | None:
        if value is not None and not (value.isdigit() and set(value) <= set("01234567") and len(value) <= 4):
            raise ValueError("must be an octal mode such as '0755' or '2775'")
        return value
