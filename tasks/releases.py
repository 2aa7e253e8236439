"""Release records: which image each service ran, when, and at which database migration revision.

Compose keeps no rollout history, and a Kubernetes ReplicaSet does not know the database: every
deploy and rollback appends a record here, so that "roll back to the previous release" works after
restarts on both runtimes and a rollback across a database migration can be refused.

The store is an append-only JSON-lines file per environment (one line per version of a record; the
last line of an id wins), written under an exclusive file lock and fsynced, so it survives restarts
and concurrent runs never interleave half lines. It lives under ``runtime.state_dir`` (absolute), so a
worker started from any working directory sees the same history; deploys and rollbacks of one
environment are serialised across workers by :func:`tasks.locks.release_lock_name`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from psycopg import sql
from pydantic import BaseModel, Field

from tasks import health
from tasks.errors import OpsError, ParameterError
from tasks.health import CheckResult, HealthReport, Status
from tasks.ops_task import ops_task
from tasks.runtime import ReleaseHistory, Revision, ServiceStatus
from tasks.secrets import mask_url
from tasks.settings import OpsSettings, PostgresSettings

logger = logging.getLogger(__name__)

# "not-switched": the deploy failed before any service changed (a missing image, a refused migration).
ReleaseStatus = Literal["recorded", "deploying", "succeeded", "failed", "rolled-back", "not-switched"]
# "scale": scale-services changed replica counts; the images are what ran then (a rollback keeps counts).
ReleaseKind = Literal["baseline", "deploy", "rollback", "scale"]
# Releases a rollback may return to: they ran healthy (a baseline is what ran before a deploy).
GOOD_STATUSES: frozenset[str] = frozenset({"recorded", "succeeded"})


class ReleaseNotFound(OpsError):
    """No release matches, or there is no earlier release to return to."""


class MigrationGuard(OpsError):
    """A rollback would cross a database migration applied since the target release."""


class ReleaseRecord(BaseModel):
    """One release of the stack: service -> image, when, and the database migration revision then."""

    id: str
    environment: str
    kind: ReleaseKind
    status: ReleaseStatus
    images: dict[str, str]
    migration_revision: str | None = None
    migration_note: str | None = None
    created_at: datetime
    updated_at: datetime
    runtime: str = ""
    flow_run_id: str | None = None
    previous_id: str | None = None
    note: str | None = None
    revisions: dict[str, str] = Field(default_factory=dict, description="runtime revision per service")
    replicas: dict[str, int] = Field(default_factory=dict, description="replica count per service, if known")

    @property
    def label(self) -> str:
        return f"{self.id} ({self.kind}, {self.created_at:%Y-%m-%d %H:%M:%S}Z)"


def new_release_id(now: datetime | None = None) -> str:
    """Sortable and unique: ``r20261128T201530Z-1a2b3c``."""
    now = now or datetime.now(UTC)
    return f"r{now:%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:6]}"


class ReleaseStore:
    """Append-only JSON-lines file of release records for one environment."""

    def __init__(self, directory: Path, environment: str) -> None:
        if not environment or not all(c.isalnum() or c in "-_" for c in environment):
            raise ParameterError(f"environment {environment!r} must be letters, digits, '-' or '_'")
        self.directory = Path(directory)
        self.environment = environment
        self.path = self.directory / f"releases-{environment}.jsonl"

    @classmethod
    def from_settings(cls, settings: OpsSettings, environment: str | None = None) -> ReleaseStore:
        return cls(settings.runtime.releases_dir, environment or settings.runtime.environment)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / f".releases-{self.environment}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_unlocked(self) -> list[ReleaseRecord]:
        if not self.path.exists():
            return []
        latest: dict[str, ReleaseRecord] = {}
        order: list[str] = []
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = ReleaseRecord.model_validate_json(line)
                except ValueError:
                    # A torn last line after a crash must not hide every other release.
                    logger.warning("%s line %d is not a release record; skipped", self.path, number)
                    continue
                if record.id not in latest:
                    order.append(record.id)
                latest[record.id] = record
        return [latest[i] for i in order]

    def save(self, record: ReleaseRecord) -> ReleaseRecord:
        """Append (a new version of) ``record``, fsynced before returning."""
        record = record.model_copy(update={"updated_at": datetime.now(UTC)})
        with self._locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, (record.model_dump_json() + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def all(self) -> list[ReleaseRecord]:
        """Every release, oldest first (creation order)."""
        with self._locked():
            return self._read_unlocked()

    def get(self, release_id: str) -> ReleaseRecord:
        for record in self.all():
            if record.id == release_id:
                return record
        raise ReleaseNotFound(
            f"no release {release_id!r} in {self.path}; run rollback-release with no release_id to see"
            " the recorded releases in its plan"
        )

    def latest_good(self) -> ReleaseRecord | None:
        """The newest release that ran healthy."""
        good = [r for r in self.all() if r.status in GOOD_STATUSES]
        return good[-1] if good else None

    def previous_good(self, current_images: dict[str, str]) -> ReleaseRecord | None:
        """The newest good release whose images differ from what runs now (the rollback target)."""
        for record in reversed(self.all()):
            if record.status not in GOOD_STATUSES:
                continue
            if any(current_images.get(s) != image for s, image in record.images.items()):
                return record
        return None

    def record(
        self,
        *,
        kind: ReleaseKind,
        status: ReleaseStatus,
        images: dict[str, str],
        migration_revision: str | None,
        migration_note: str | None = None,
        runtime: str = "",
        flow_run_id: str | None = None,
        previous_id: str | None = None,
        note: str | None = None,
        revisions: dict[str, str] | None = None,
        replicas: dict[str, int] | None = None,
    ) -> ReleaseRecord:
        """Create and save a new release record."""
        now = datetime.now(UTC)
        return self.save(
            ReleaseRecord(
                id=new_release_id(now),
                environment=self.environment,
                kind=kind,
                status=status,
                images=dict(images),
                migration_revision=migration_revision,
                migration_note=migration_note,
                created_at=now,
                updated_at=now,
                runtime=runtime,
                flow_run_id=flow_run_id,
                previous_id=previous_id,
                note=note,
                revisions=dict(revisions or {}),
                replicas=dict(replicas or {}),
            )
        )

    def update(self, record: ReleaseRecord, **changes: object) -> ReleaseRecord:
        """Save a new version of ``record`` with ``changes`` (status, note...)."""
        return self.save(record.model_copy(update=changes))


@dataclass(frozen=True)
class MigrationRevision:
    """The database's applied migration revision, and where it came from (or why it is unknown)."""

    revision: str | None
    source: str


def read_migration_revision(pg: PostgresSettings, query: str | None = None) -> MigrationRevision:
    """The migration revision the database is at now.

    ``alembic_version`` when that table exists; else ``query`` when configured (one row, first column);
    else Prisma's ``_prisma_migrations`` (the newest finished migration) when present; else None.
    An unreachable database gives None with the (masked) reason: the release is still recorded.
    """
    import psycopg

    from tasks import postgres

    try:
        with postgres.connect(pg) as conn:
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT c.relname FROM pg_class c WHERE c.relkind IN ('r', 'p', 'v')"
                    " AND c.relname IN ('alembic_version', '_prisma_migrations')"
                    " AND pg_table_is_visible(c.oid)"
                ).fetchall()
            }
            if "alembic_version" in tables:
                rows = conn.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall()
                revision = ",".join(str(r[0]) for r in rows) or None
                return MigrationRevision(revision, "alembic_version")
            if query:
                row = conn.execute(sql.SQL(query)).fetchone()  # the operator's own query
                return MigrationRevision(None if row is None else str(row[0]), "runtime.migration_query")
            if "_prisma_migrations" in tables:
                row = conn.execute(
                    "SELECT migration_name FROM _prisma_migrations WHERE finished_at IS NOT NULL"
                    " AND rolled_back_at IS NULL ORDER BY finished_at DESC, migration_name DESC LIMIT 1"
                ).fetchone()
                return MigrationRevision(None if row is None else str(row[0]), "_prisma_migrations")
            return MigrationRevision(None, "no migration table in the database")
    except psycopg.Error as exc:
        return MigrationRevision(None, f"database unreachable: {postgres.safe_error(exc, pg)}")


@dataclass(frozen=True)
class RollbackStep:
    """One service's move: from the image running now to the target image, and how."""

    service: str
    from_image: str | None
    to_image: str
    method: Literal["revision", "image", "none"]
    revision: str | None = None

    @property
    def changes(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        if self.method == "none":
            return f"{self.service}: already at {self.to_image}"
        how = f"rollout undo to revision {self.revision}" if self.method == "revision" else "set image"
        return f"{self.service}: {self.from_image} -> {self.to_image} ({how})"


def plan_rollback(
    current: Sequence[ServiceStatus],
    target_images: dict[str, str],
    histories: dict[str, list[Revision]],
) -> list[RollbackStep]:
    """The steps that bring each service of ``target_images`` back to its image.

    A runtime revision with exactly that image (a ReplicaSet kept by Kubernetes) is preferred: undoing
    to it restores the whole pod template, not just the image. Otherwise the image is set.
    """
    running = {s.name: s.image for s in current}
    steps = []
    for service, image in target_images.items():
        now = running.get(service)
        if now == image:
            steps.append(RollbackStep(service, now, image, "none"))
            continue
        match = [r for r in histories.get(service, []) if not r.current and set(r.images.values()) == {image}]
        if match:
            steps.append(RollbackStep(service, now, image, "revision", match[-1].revision))
        else:
            steps.append(RollbackStep(service, now, image, "image"))
    return steps


def migrations_since(
    store_records: Sequence[ReleaseRecord], target: ReleaseRecord, current_revision: str | None
) -> list[str]:
    """Migration revisions applied after ``target`` ran: recorded by later releases, and the database's.

    The database's revision now is the authority when known: back at the target's revision (migrated
    down), nothing is crossed. Empty also when the target recorded no revision (its database state
    is unknown; the guard cannot tell).
    """
    if target.migration_revision is None:
        return []
    if current_revision is not None and current_revision == target.migration_revision:
        return []
    ids = [record.id for record in store_records]
    later = ids.index(target.id) + 1 if target.id in ids else 0
    seen: list[str] = []
    for record in store_records[later:]:
        revision = record.migration_revision
        if revision and revision != target.migration_revision and revision not in seen:
            seen.append(revision)
    if current_revision is not None and current_revision not in seen:
        seen.append(current_revision)
    return seen


def guard_migrations(
    store_records: Sequence[ReleaseRecord],
    target: ReleaseRecord,
    current: MigrationRevision,
    *,
    force: bool,
) -> list[str]:
    """Refuse a rollback to a release older than a database migration applied since, unless forced.

    Returns:
        The migrations crossed (empty when none, or when ``force`` let them through).

    Raises:
        MigrationGuard: migrations were applied since ``target`` and ``force`` is false; names them.
    """
    crossed = migrations_since(store_records, target, current.revision)
    if crossed and not force:
        raise MigrationGuard(
            f"refusing to roll back to release {target.id}: it ran with database migration"
            f" {target.migration_revision!r}, and {', '.join(repr(m) for m in crossed)} was applied since"
            f" (database now at {current.revision!r}, from {current.source}). The old code may not work"
            " with the new schema: restore the database or migrate down first, or pass force=true if the"
            " migration is backwards compatible. Nothing was changed."
        )
    return crossed if force else []


VerificationScope = Literal["full", "services"]


def verification_report(
    settings: OpsSettings, scope: VerificationScope = "full", smoke_urls: Sequence[str] = ()
) -> HealthReport:
    """The health evidence a release, restart or rollback is judged on.

    ``full``: every health check (PostgreSQL, Redis, queues, the app's HTTP endpoints); ``services``:
    only the app's own HTTP endpoints (where the databases are not what changed). Smoke URLs are
    added as ``smoke:<url>`` checks in both.
    """
    checks: dict[str, Callable[[], CheckResult]] = {}
    if scope == "full":
        checks.update(health.all_checks(settings))
    else:
        for url in settings.health.urls:
            checks[health.http_check_name(url)] = functools.partial(health.check_http, url, settings)
    for url in smoke_urls:
        checks[f"smoke:{mask_url(url)}"] = functools.partial(health.check_http, url, settings)
    deadline = settings.health.timeout_seconds * 2 + 1
    results = {name: health.run_with_deadline(name, check, deadline) for name, check in checks.items()}
    return health.assemble_report(settings.stack, results)


def _check_fails(name: str, check: CheckResult) -> bool:
    app_check = name.startswith(("http:", "smoke:"))
    return check.status is Status.UNHEALTHY or (app_check and check.status is not Status.HEALTHY)


def verification_failures(report: HealthReport) -> list[str]:
    """Why the report does not prove a healthy release: any unhealthy check, and any app endpoint or
    smoke URL that is not fully healthy (an endpoint reporting itself unhealthy counts)."""
    return [
        f"{name}: {check.error or '; '.join(check.warnings) or check.status.value}"
        for name, check in report.checks.items()
        if _check_fails(name, check)
    ]


@dataclass(frozen=True)
class HealthWait:
    """The health evidence after polling, how long it took and when each check first passed."""

    report: HealthReport
    failures: list[str]
    seconds: float
    attempts: int
    passed_after: dict[str, float | None]


def wait_verified(
    settings: OpsSettings,
    scope: VerificationScope,
    smoke_urls: Sequence[str],
    timeout_seconds: float,
) -> HealthWait:
    """Poll the health evidence (:func:`verification_report`) until it proves the release, or until
    ``timeout_seconds`` pass; at least one round runs.

    A server may run long before it listens (a runtime without a readiness probe calls it ready as
    soon as its process starts), so a refused connection or a 503 is asked again, every
    ``runtime.poll_interval_seconds``, until the timeout.

    Returns:
        The last report, its failures (empty when healthy), the seconds and rounds it took, and for
        each check the seconds after which it first passed (None: never).
    """
    started = time.monotonic()
    deadline = started + max(timeout_seconds, 0.0)
    passed_after: dict[str, float | None] = {}
    attempts = 0
    while True:
        attempts += 1
        report = verification_report(settings, scope, smoke_urls)
        elapsed = time.monotonic() - started
        for name, check in report.checks.items():
            if passed_after.get(name) is None:
                passed_after[name] = None if _check_fails(name, check) else round(elapsed, 2)
        failures = verification_failures(report)
        if not failures or time.monotonic() >= deadline:
            return HealthWait(report, failures, round(elapsed, 2), attempts, passed_after)
        logger.info("not healthy yet (%s); asking again", "; ".join(failures))
        time.sleep(min(settings.runtime.poll_interval_seconds, max(deadline - time.monotonic(), 0.0)))


@dataclass(frozen=True)
class Readiness:
    """How a deploy, rollback or restart became ready: the runtime's own readiness, then health."""

    statuses: list[ServiceStatus]
    services_seconds: float
    health: HealthWait | None = None

    @property
    def report(self) -> HealthReport | None:
        return self.health.report if self.health else None

    @property
    def failures(self) -> list[str]:
        return self.health.failures if self.health else []

    def as_dict(self) -> dict[str, object]:
        return {
            "services_ready_seconds": self.services_seconds,
            "health_seconds": self.health.seconds if self.health else None,
            "health_attempts": self.health.attempts if self.health else 0,
            "checks": dict(self.health.passed_after) if self.health else {},
        }

    def lines(self) -> list[str]:
        """Markdown: how long each wait took."""
        out = [f"- services ready (the runtime's readiness): after {self.services_seconds:g} s"]
        if self.health is None:
            return [*out, "- health: not checked"]
        verdict = "passed" if not self.health.failures else "still failing at the timeout"
        out.append(
            f"- health and smoke URLs: {verdict} after {self.health.seconds:g} s more"
            f" ({self.health.attempts} round{'s' if self.health.attempts != 1 else ''})"
        )
        out += [
            f"  - {name}: " + ("never passed" if seconds is None else f"passed after {seconds:g} s")
            for name, seconds in self.health.passed_after.items()
        ]
        return out


wait_verified_task = ops_task(wait_verified, name="wait-healthy")


def release_history(settings: OpsSettings) -> ReleaseHistory:
    """The recorded releases of this environment as a runtime's history: for each service, the
    releases that ran healthy and name it, oldest first (what Compose rolls back to)."""

    def history(service: str) -> list[Revision]:
        return [
            Revision(
                service=service,
                revision=record.id,
                images={service: record.images[service]},
                created_at=record.created_at,
                note=f"{record.kind} {record.status}",
            )
            for record in ReleaseStore.from_settings(settings).all()
            if record.status in GOOD_STATUSES and service in record.images
        ]

    return history
