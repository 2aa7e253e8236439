"""The Prefect tasks of the uploads cleanup (each plain function wrapped once, here) and the flow's
progress callback."""

from __future__ import annotations

from collections.abc import Callable

from tasks.ops_task import ops_task
from tasks.reports import Progress
from tasks.runlog import run_logger
from tasks.uploads.cleanup import clean_uploads
from tasks.uploads.guard import check_root
from tasks.uploads.locations import disk_usage
from tasks.uploads.quarantine import prepare_quarantine, purge_quarantine, restore_quarantine_run
from tasks.uploads.remove import remove_planned

check_root_task = ops_task(check_root, name="check-uploads-root")
prepare_quarantine_task = ops_task(prepare_quarantine, name="prepare-uploads-quarantine")
disk_usage_task = ops_task(disk_usage, name="disk-usage", retries=1)
clean_uploads_task = ops_task(clean_uploads, name="clean-uploads")
remove_planned_task = ops_task(remove_planned, name="remove-planned-uploads")
purge_quarantine_task = ops_task(purge_quarantine, name="purge-uploads-quarantine")
restore_quarantine_task = ops_task(restore_quarantine_run, name="restore-uploads-quarantine")


def progress_reporter(key: str, total: int | None, every: int = 20000) -> Callable[[int], None]:
    """An ``on_progress`` callback: logs every ``every`` files and, when the total is known (a saved
    plan), updates a progress artifact (silent outside a run)."""
    artifact = Progress(key, f"Planned uploads handled, of {total}") if total else None
    state = {"logged": 0}

    def report(done: int) -> None:
        if artifact is not None and total:
            artifact.update(100.0 * done / total)
        if done - state["logged"] >= every:
            state["logged"] = done
            run_logger(__name__).info("uploads: %d planned files handled so far", done)

    return report
