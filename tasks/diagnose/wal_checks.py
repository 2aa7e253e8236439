"""The point-in-time archive, where it is in use: the newest WAL received and its age (the RPO), the
replication slot and the WAL it keeps on the server, gaps, timelines and the restorable window. Not
part of the runbook's list: without a WAL archive (no base backup, no WAL in the storage) the
diagnosis has no such section."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tasks.diagnose.deadline import with_deadline
from tasks.diagnose.model import Diagnosis, Finding, Severity
from tasks.reports import elapsed_ms
from tasks.secrets import safe_error
from tasks.settings import OpsSettings
from tasks.storage import open_storage
from tasks.wal.status import UNREPLAYABLE, ArchiveStatus, archive_in_use, archive_status

CHECK = "wal-archive"
TITLE = "WAL archive (point-in-time recovery)"
RB_PITR = "Backup: point-in-time recovery (WAL archive)"
FLOW_CHECK_ARCHIVE = "check-wal-archive"
FLOW_BACKUP_BASE = "backup-base"


@dataclass(frozen=True)
class WalArchiveEvidence:
    """The archive's status as the diagnosis shows it."""

    status: ArchiveStatus
    rpo_warn_seconds: float

    def rows(self) -> list[dict[str, Any]]:
        s, slot = self.status, self.status.slot
        return [
            {"item": "newest WAL", "value": f"{s.last_wal or '-'} at {s.last_wal_at or '-'}"},
            {"item": "RPO (its age)", "value": f"{s.rpo_seconds} s (threshold {self.rpo_warn_seconds:g} s)"},
            {"item": "segments archived", "value": s.segments},
            {
                "item": "replication slot",
                "value": "-"
                if slot is None
                else f"{slot.name}: exists={slot.exists} active={slot.active}"
                f" retained={slot.lag_bytes} bytes (restart_lsn {slot.restart_lsn})"
                f" wal_status={slot.wal_status or '-'} safe_wal_size={slot.safe_wal_size}",
            },
            {"item": "gaps", "value": ", ".join(s.gaps) or "none"},
            {"item": "timelines", "value": ", ".join(str(t) for t in s.timelines) or "-"},
            {"item": "base backups", "value": s.base_backups},
            {
                "item": "restorable window",
                "value": f"{s.window_start or '-'} ({s.window_start_backup or '-'}) .. {s.window_end or '-'}"
                f" ({s.window_end_wal or '-'})",
            },
        ]


def wal_archive_findings(status: ArchiveStatus) -> list[Finding]:
    """One finding per problem of the archive (a pure function of the status): a gap or a lost slot
    is critical (no restore can replay across it), the rest warnings."""
    findings = []
    slot_lost = status.slot is not None and status.slot.lost
    for problem in status.problems:
        if "no base backup" in problem:
            resolution, flow = "Take a base backup; the window starts at its end", FLOW_BACKUP_BASE
        elif slot_lost and "is lost" in problem:
            resolution = (
                "Start or restart the archiver (python -m tasks.wal.archiver): it re-creates the slot and"
                " records the gap; then run backup-base, so that restores to a point after the gap work"
            )
            flow = FLOW_BACKUP_BASE
        else:
            resolution = (
                "Check the archiver service (python -m tasks.wal.archiver --status, its log); the slot keeps"
                " the WAL on the server meanwhile, so its disk fills while the archiver is down"
            )
            flow = FLOW_CHECK_ARCHIVE
        severity = Severity.CRITICAL if UNREPLAYABLE in problem else Severity.WARNING
        findings.append(Finding(CHECK, severity, problem, RB_PITR, resolution, flow))
    return findings


def wal_archive(settings: OpsSettings) -> Diagnosis | None:
    """The archive's evidence and findings; None when point-in-time recovery is not in use (or the
    storage does not say so before the check's deadline), so the diagnosis stays as without it."""
    started = time.perf_counter()
    deadline = settings.diagnose.check_deadline_seconds
    try:
        in_use = with_deadline(lambda: archive_in_use(open_storage(settings.storage, attempts=1)), deadline)
    except Exception:
        return None
    if not in_use:
        return None
    try:
        status = with_deadline(lambda: archive_status(settings), deadline)
    except Exception as exc:
        text = safe_error(exc, settings)
        finding = Finding(
            CHECK,
            Severity.WARNING,
            f"the WAL archive could not be read: {text}",
            RB_PITR,
            "Check the storage and run check-wal-archive",
            FLOW_CHECK_ARCHIVE,
        )
        return Diagnosis(CHECK, TITLE, None, (finding,), error=text, duration_ms=elapsed_ms(started))
    return Diagnosis(
        CHECK,
        TITLE,
        WalArchiveEvidence(status, settings.wal.rpo_warn_seconds),
        tuple(wal_archive_findings(status)),
        duration_ms=elapsed_ms(started),
    )
