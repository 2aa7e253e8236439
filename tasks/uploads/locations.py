"""Where the cleanup keeps things and how runs are named: the quarantine and plan directories, disk
usage, run ids, and the one-cleanup-at-a-time lock."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.errors import ParameterError
from tasks.settings import DEFAULT_STATE_DIR, StorageSettings, UploadsSettings

RUN_ID_PATTERN = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{6,32})$")
PLAN_SUFFIX = ".jsonl"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def quarantine_directory(settings: UploadsSettings, root: Path) -> Path:
    """The configured quarantine directory, or ``<root>/../.uploads-quarantine``, resolved."""
    configured = settings.quarantine_dir
    return Path(
        os.path.realpath(configured if configured is not None else root.parent / ".uploads-quarantine")
    )


def plan_directory(
    uploads: UploadsSettings, storage: StorageSettings, state_dir: Path = DEFAULT_STATE_DIR
) -> Path:
    """Where plans go: ``uploads.plan_dir``, else next to file:// backups, else under the state
    directory every worker shares (``runtime.state_dir``), never relative to the working directory."""
    if uploads.plan_dir is not None:
        return uploads.plan_dir
    parts = urlsplit(storage.url)
    if parts.scheme == "file":
        return Path(unquote(parts.netloc + parts.path)) / "uploads-plans"
    return state_dir / "uploads-plans"


@dataclass(frozen=True)
class DiskUsage:
    """The runbook's ``df -h`` for the filesystem of one path."""

    path: str
    total: int
    used: int
    free: int

    @property
    def used_percent(self) -> float:
        return round(100 * self.used / self.total, 1) if self.total else 0.0


def disk_usage(path: Path) -> DiskUsage:
    """Total, used and free bytes of the filesystem holding ``path``."""
    usage = shutil.disk_usage(path)
    return DiskUsage(path=str(path), total=usage.total, used=usage.used, free=usage.free)


def new_run_id(now: datetime | None = None, token: str | None = None) -> str:
    """A dated, unique run id such as ``20261128T021500Z-3fa2b1c0``."""
    now = now or datetime.now(UTC)
    token = (token or secrets.token_hex(4)).replace("-", "").lower()[:12]
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{token}"


def run_id_time(run_id: str) -> datetime:
    """The time a run id was made.

    Raises:
        ParameterError: not a run id.
    """
    match = RUN_ID_PATTERN.match(run_id)
    if match is None:
        raise ParameterError(f"{run_id!r} is not a cleanup run id (like 20261128T021500Z-3fa2b1c0)")
    stamp = match.group(1)
    try:
        return datetime(
            int(stamp[0:4]),
            int(stamp[4:6]),
            int(stamp[6:8]),
            int(stamp[9:11]),
            int(stamp[11:13]),
            int(stamp[13:15]),
            tzinfo=UTC,
        )
    except ValueError:
        raise ParameterError(f"{run_id!r} is not a cleanup run id (its date is impossible)") from None
