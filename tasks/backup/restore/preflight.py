"""What a restore or a swap back would do, computed without touching anything."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tasks.backup.database import _maintenance, _server, scratch_name
from tasks.backup.errors import DatabaseNotFound
from tasks.backup.manifest import BackupManifest
from tasks.backup.restore.swap import ConnectionInfo, _connections, _is_kept_of, kept_name
from tasks.errors import ParameterError
from tasks.settings import OpsSettings


@dataclass(frozen=True)
class RestorePreflight:
    """What a restore would do, computed without touching anything."""

    backup_id: str
    backup_finished_at: datetime
    backup_size_bytes: int
    backup_rows: int
    backup_verified: str | None
    target_database: str
    target_exists: bool
    target_size_bytes: int | None
    connections: list[ConnectionInfo]
    scratch_database: str
    old_database: str | None
    keep_old: bool

    def steps(self) -> list[str]:
        steps = [
            f"re-read backup {self.backup_id} and check its sha256 ({self.backup_size_bytes} bytes)",
            f"restore it into a new database {self.scratch_database}",
            f"compare {self.scratch_database} with the manifest ({self.backup_rows} rows)",
        ]
        if self.target_exists:
            steps.append(
                f"block new connections to {self.target_database} and end its {len(self.connections)}"
                " sessions"
            )
            steps.append(
                f"rename {self.target_database} -> {self.old_database} and {self.scratch_database} ->"
                f" {self.target_database} in one transaction"
            )
            steps.append(
                f"keep {self.old_database} (read-only by default) and list its tables whose rows changed"
                " since the backup"
                if self.keep_old
                else f"drop {self.old_database} (the old database)"
            )
        else:
            steps.append(f"rename {self.scratch_database} -> {self.target_database}")
        return steps


def restore_preflight(
    settings: OpsSettings,
    manifest: BackupManifest,
    *,
    target_database: str | None = None,
    keep_old: bool = False,
) -> RestorePreflight:
    """What restoring ``manifest`` into ``target_database`` would do; reads only."""
    target = target_database or manifest.database
    with _maintenance(settings) as conn:
        row = conn.execute(
            "SELECT pg_database_size(datname) FROM pg_database WHERE datname = %s", (target,)
        ).fetchone()
        exists = row is not None
        connections = _connections(conn, target) if exists else []
    return RestorePreflight(
        backup_id=manifest.id,
        backup_finished_at=manifest.finished_at,
        backup_size_bytes=manifest.size_bytes,
        backup_rows=manifest.total_rows,
        backup_verified=manifest.strongest_verified,
        target_database=target,
        target_exists=exists,
        target_size_bytes=int(row[0]) if row is not None else None,
        connections=connections,
        scratch_database=scratch_name(target, "restore"),
        old_database=kept_name(target) if exists else None,
        keep_old=keep_old,
    )


@dataclass(frozen=True)
class SwapBackPreflight:
    """What putting a kept database back in place would do, computed without touching anything."""

    kept_database: str
    target_database: str
    kept_size_bytes: int
    target_size_bytes: int
    connections: list[ConnectionInfo]
    replaced_database: str

    def steps(self) -> list[str]:
        return [
            f"count and hash every table of {self.kept_database}",
            f"block new connections to {self.target_database} and end its {len(self.connections)} sessions",
            f"rename {self.target_database} -> {self.replaced_database} and {self.kept_database} ->"
            f" {self.target_database} in one transaction",
            f"keep {self.replaced_database} (read-only by default): nothing is dropped",
            f"count and hash every table of {self.target_database} and prove it equals what"
            f" {self.kept_database} held",
        ]


def swap_back_preflight(
    settings: OpsSettings, kept_database: str, *, target_database: str
) -> SwapBackPreflight:
    """What :func:`swap_back` would do; reads only.

    Raises:
        ParameterError: ``kept_database`` is not a database a restore of ``target_database`` kept.
        DatabaseNotFound: either database does not exist.
    """
    if not _is_kept_of(kept_database, target_database):
        raise ParameterError(
            f"{kept_database!r} is not a database a restore of {target_database!r} kept (those are named"
            f" {kept_name(target_database)[:-14]}<time>); nothing was done"
        )
    with _maintenance(settings) as conn:
        sizes: dict[str, int] = dict(
            conn.execute(
                "SELECT datname, pg_database_size(datname) FROM pg_database WHERE datname = ANY(%s)",
                ([kept_database, target_database],),
            ).fetchall()
        )
        for name in (kept_database, target_database):
            if name not in sizes:
                raise DatabaseNotFound(
                    f"database {name!r} does not exist on {_server(settings)}; nothing was done"
                )
        connections = _connections(conn, target_database)
        # A swap back within the same second as the restore would reuse the kept name: step past it.
        now = datetime.now(UTC)
        replaced = kept_name(target_database, now)
        for seconds in range(1, 120):
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (replaced,)).fetchone():
                break
            replaced = kept_name(target_database, now + timedelta(seconds=seconds))
    return SwapBackPreflight(
        kept_database=kept_database,
        target_database=target_database,
        kept_size_bytes=int(sizes[kept_database]),
        target_size_bytes=int(sizes[target_database]),
        connections=connections,
        replaced_database=replaced,
    )
