"""The errors and typed results of schema migrations: plans, change records, evidence, marker rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tasks.errors import CheckFailed, OpsError
from tasks.postgres import QueryCheck

# The target that means "every pending migration" (Alembic's head; a command tool's plain apply).
HEAD = "head"


class MigrationError(OpsError):
    """A migration step failed."""


class InterruptedMigration(OpsError):
    """A previous run did not finish (killed, or failed without a completed restore)."""

    def __init__(self, message: str, runs: list[MigrationRun]) -> None:
        super().__init__(message)
        self.runs = runs

    def __reduce__(self) -> tuple[Any, ...]:
        # Failed states carry the exception; it must survive pickling with its runs.
        return (type(self), (self.args[0], self.runs))


class MigrationVerifyFailed(CheckFailed):
    """Migrations ran but the database is not at the target, or a smoke query failed."""


@dataclass(frozen=True)
class RevisionStep:
    """One pending revision: its id, parent, message and the SQL ``upgrade --sql`` emits for it."""

    revision: str
    down_revision: str | None
    description: str
    sql: str | None = None


@dataclass(frozen=True)
class MigrationStatus:
    """Where the database is: current and head revisions (Alembic) or the tool's status output."""

    tool: str
    database: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: tuple[str, ...]
    up_to_date: bool
    output: str = ""


@dataclass(frozen=True)
class MigrationPlan:
    """What applying would do: the pending revisions with their SQL, or the tool's status output."""

    tool: str
    database: str
    current: tuple[str, ...]
    target: tuple[str, ...]
    steps: tuple[RevisionStep, ...]
    status_output: str = ""
    apply_command: str = ""
    requested_target: str = HEAD

    @property
    def pending(self) -> bool:
        return bool(self.steps)


@dataclass(frozen=True)
class AppliedStep:
    """One revision (or the tool's one apply command) that ran, with its duration."""

    revision: str
    seconds: float


@dataclass(frozen=True)
class ApplyRecord:
    """Change record of an apply: what ran, in what order, how long, and the commands (masked)."""

    run_id: str
    tool: str
    database: str
    from_revisions: tuple[str, ...]
    to_revisions: tuple[str, ...]
    steps: tuple[AppliedStep, ...]
    commands: tuple[str, ...] = ()
    changed: bool = True
    seconds: float = 0.0


# One smoke query's result: the project's one check-query result (query, ok, value, error, ms).
SmokeResult = QueryCheck


@dataclass(frozen=True)
class Verification:
    """Evidence after applying: the status against the plan's target and the smoke queries."""

    status: MigrationStatus
    at_target: bool
    smoke: tuple[SmokeResult, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class MigrationRun:
    """A row of the durable run marker table."""

    id: str
    status: str
    backup_id: str | None
    started_at: datetime
    updated_at: datetime
    from_revisions: tuple[str, ...]
    to_revisions: tuple[str, ...]
    host: str
    pid: int
    flow_run_id: str | None
    note: str | None = None
