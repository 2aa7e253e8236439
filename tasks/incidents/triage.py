"""Outage triage: what changed recently (releases, runtime revisions, migration runs), and a rollback
proposal when a recent release meets an unhealthy stack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from tasks import postgres
from tasks.runtime import ServiceStatus
from tasks.settings import OpsSettings


@dataclass(frozen=True)
class RecentChange:
    """Something that changed recently: a release, a runtime revision, a migration."""

    kind: str
    what: str
    at: datetime | None
    detail: str = ""

    def as_row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "what": self.what,
            "at": self.at.isoformat(timespec="seconds") if self.at else "",
            "detail": self.detail,
        }


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def recent_changes(
    records: Sequence[Any],
    histories: Mapping[str, Sequence[Any]],
    migration_runs: Sequence[RecentChange],
    *,
    window: timedelta,
    now: datetime,
) -> list[RecentChange]:
    """Releases (deploys and rollbacks), runtime revisions and migrations within ``window`` of ``now``."""
    since = now - window
    changes = []
    for record in records:
        created = _aware(record.created_at)
        if record.kind in {"deploy", "rollback"} and created is not None and created >= since:
            images = ", ".join(f"{s}={i}" for s, i in sorted(record.images.items()))
            changes.append(
                RecentChange(
                    "release",
                    record.id,
                    created,
                    f"{record.kind} {record.status}: {images}; migration {record.migration_revision or '-'}",
                )
            )
    recorded_release_ids = {r.id for r in records}
    for service, revisions in histories.items():
        for revision in revisions:
            created = _aware(revision.created_at)
            # Compose history is the release records themselves: do not count them twice.
            if revision.revision in recorded_release_ids or created is None or created < since:
                continue
            changes.append(
                RecentChange(
                    "revision",
                    f"{service} revision {revision.revision}",
                    created,
                    ", ".join(revision.images.values()) + (" (current)" if revision.current else ""),
                )
            )
    changes += [m for m in migration_runs if m.at is not None and m.at >= since]
    return sorted(changes, key=lambda c: c.at or now, reverse=True)


def recent_migration_runs(settings: OpsSettings, *, window: timedelta) -> list[RecentChange]:
    """Migration runs recorded by migrate-database within ``window`` (none when the table is absent)."""
    table = f'"{settings.migrations.runs_schema}"."migration_runs"'
    with postgres.connect(settings.postgres, application_name="swagger2mcp-ops-triage") as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if not exists or not exists[0]:
            return []
        rows = conn.execute(
            sql.SQL(
                "SELECT id::text, status, started_at, array_to_string(from_revisions, ','),"
                " array_to_string(to_revisions, ',') FROM {}.{} WHERE started_at >= now() - %s"
                " ORDER BY started_at DESC"
            ).format(sql.Identifier(settings.migrations.runs_schema), sql.Identifier("migration_runs")),
            (window,),
        ).fetchall()
    return [
        RecentChange(
            "migration", f"migration run {r[0]}", _aware(r[2]), f"{r[1]}: {r[3] or '-'} -> {r[4] or '-'}"
        )
        for r in rows
    ]


@dataclass(frozen=True)
class RollbackProposal:
    """Why a rollback is proposed, from what to what."""

    reason: str
    recent: tuple[RecentChange, ...]
    current_images: dict[str, str]
    target_release: str | None
    target_images: dict[str, str]

    def describe(self) -> str:
        lines = [self.reason, ""]
        lines += [
            f"- {c.kind} {c.what} at {c.at:%Y-%m-%d %H:%M:%S}Z: {c.detail}" for c in self.recent if c.at
        ]
        now = ", ".join(f"{s}={i}" for s, i in sorted(self.current_images.items())) or "unknown"
        lines += ["", f"Running now: {now}."]
        if self.target_release:
            back = ", ".join(f"{s}={i}" for s, i in sorted(self.target_images.items()))
            lines.append(f"rollback-release would return to release {self.target_release}: {back}.")
        else:
            lines.append("rollback-release would undo each service to its previous runtime revision.")
        return "\n".join(lines)


def propose_rollback(
    changes: Sequence[RecentChange],
    *,
    healthy: bool,
    services: Sequence[ServiceStatus],
    previous_good: Any | None,
    propose_when_healthy: bool = False,
) -> RollbackProposal | None:
    """A rollback proposal when a release (or runtime revision) is recent and the stack is not healthy."""
    recent = [c for c in changes if c.kind in {"release", "revision"}]
    if not recent or (healthy and not propose_when_healthy):
        return None
    newest = recent[0]
    state = "the stack is healthy (proposal asked for anyway)" if healthy else "the stack is not healthy"
    return RollbackProposal(
        reason=(
            f"{state} and {len(recent)} change(s) were released within the window, the newest"
            f" {newest.what} at {newest.at:%H:%M:%S}Z."
        ),
        recent=tuple(recent),
        current_images={s.name: s.image for s in services if s.image},
        target_release=previous_good.id if previous_good is not None else None,
        target_images=dict(previous_good.images) if previous_good is not None else {},
    )
