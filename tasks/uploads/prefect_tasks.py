"""The Prefect tasks of the uploads cleanup (each plain function wrapped once, here) and the flow's
progress callback."""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.reports import Progress
from tasks.runlog import run_logger
from tasks.uploads.cleanup import clean_uploads
from tasks.uploads.guard import check_root
from tasks.uploads.locations import disk_usage
from tasks.uploads.quarantine import prepare_quarantine, purge_quarantine, restore_quarantine_run
from tasks.uploads.remove import remove_planned

check_root_task = task(name="check-uploads-root", cache_policy=NO_CACHE)(check_root)
prepare_quarantine_task = task(name="prepare-uploads-quarantine", cache_policy=NO_CACHE)(prepare_quarantine)
disk_usage_task = task(name="disk-usage", cache_policy=NO_CACHE, retries=1)(disk_usage)
clean_uploads_task = task(name="clean-uploads", cache_policy=NO_CACHE)(clean_uploads)
remove_planned_task = task(name="remove-planned-uploads", cache_policy=NO_CACHE)(remove_planned)
purge_quarantine_task = task(name="purge-uploads-quarantine", cache_policy=NO_CACHE)(purge_quarantine)
restore_quarantine_task = task(name="restore-uploads-quarantine", cache_policy=NO_CACHE)(
    restore_quarantine_run
)


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
