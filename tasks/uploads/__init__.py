"""Uploads: find old files under the uploads root, plan their removal, quarantine or delete them,
purge old quarantine runs and restore a run from quarantine.

Safety properties, and how they hold:

- Nothing outside the root is ever read, moved or removed. The scan opens every directory relative to
  its parent's descriptor with ``O_NOFOLLOW | O_DIRECTORY``; symlinks (to files or directories) are
  never followed and never acted on; no path is ever joined from strings and re-resolved.
- One filesystem: a directory whose ``st_dev`` differs from the root's is not entered unless
  ``cross_filesystem`` is set (a bind mount of ``/`` under the uploads root stays untouched).
- The plan is exactly the files that would go (regular files older than the cutoff, not protected,
  not referenced by the application's database), written as JSON Lines.
- :func:`remove_planned` is the one function that moves or deletes, and only with ``confirm=True``
  (a delete run without a reference query takes its one-pass form, ``_plan_and_delete``, which acts
  per directory right after the scan wrote that directory's files to the plan, with the same checks,
  in a helper process, :mod:`tasks.unlink_helper`, given the directory's descriptor).
  Right before acting it re-checks every file through descriptors (still a regular file, same
  ``st_dev``/``st_ino`` and inode change time, still older than the cutoff, still unreferenced); a
  file that changed is skipped and reported.
- Quarantine is a rename into ``<quarantine>/<run_id>/files/<relative path>`` on the same
  filesystem; ``<quarantine>/<run_id>/manifest.jsonl`` lists what moved, so the run can be restored.

File names are handled as the OS gives them: a name that is not valid UTF-8 is carried as a ``str``
with surrogate escapes (``os.fsdecode``) and written to plans and manifests as base64 of its bytes
(``path_b64``), so it round-trips exactly.

The scan and the plan stream: memory does not grow with the number of files (one batch of candidates
for the database check and a few top-N lists at most).

The package, along the cleanup's steps (every name below is re-exported here, so ``from tasks import
uploads; uploads.X`` and ``from tasks.uploads import X`` work whichever module holds ``X``):

- :mod:`~tasks.uploads.guard`: the root's guard rules and the owner/mode check (:func:`check_root`);
- :mod:`~tasks.uploads.locations`: quarantine and plan directories, disk usage, run ids, the lock;
- :mod:`~tasks.uploads.records`: the plan/manifest record of a file (:class:`FileEntry`), error log;
- :mod:`~tasks.uploads.protect`: protect patterns;
- :mod:`~tasks.uploads.scan`: the scan;
- :mod:`~tasks.uploads.references`: the database reference check;
- :mod:`~tasks.uploads.plan`: the plan writer and summary;
- :mod:`~tasks.uploads.cleanup`: one cleanup, plan then removal (:func:`clean_uploads`);
- :mod:`~tasks.uploads.remove`: :func:`remove_planned` and the directory chains it acts through;
- :mod:`~tasks.uploads.one_pass`: the one-pass delete and its helper process client;
- :mod:`~tasks.uploads.quarantine`: quarantine preflight, purge and restore;
- :mod:`~tasks.uploads.prefect_tasks`: the Prefect tasks, wrapped once.
"""

from __future__ import annotations

from tasks.errors import LockBusy
from tasks.uploads.cleanup import CleanupOutcome, clean_uploads
from tasks.uploads.errors import (
    PlanInvalid,
    QuarantineInvalid,
    QuarantineRunNotFound,
    ReferenceCheckFailed,
    UploadsError,
    UploadsRootInvalid,
    UploadsRootRefused,
)
from tasks.uploads.guard import (
    PROJECT_DIR,
    SYSTEM_DIRECTORIES,
    RootCheck,
    check_root,
    location_refusal,
    refuse_location,
)
from tasks.uploads.locations import (
    PLAN_SUFFIX,
    RUN_ID_PATTERN,
    DiskUsage,
    disk_usage,
    new_run_id,
    plan_directory,
    quarantine_directory,
    run_id_time,
)
from tasks.uploads.one_pass import _Remover as _Remover  # for tests of the one-pass delete
from tasks.uploads.plan import TOP_N, PlanSummary, PlanWriter, count_plan, iter_plan
from tasks.uploads.prefect_tasks import (
    check_root_task,
    clean_uploads_task,
    disk_usage_task,
    prepare_quarantine_task,
    progress_reporter,
    purge_quarantine_task,
    remove_planned_task,
    restore_quarantine_task,
)
from tasks.uploads.protect import ProtectMatcher
from tasks.uploads.quarantine import (
    PurgeRecord,
    RestoreRecord,
    latest_quarantine_runs,
    prepare_quarantine,
    purge_quarantine,
    restore_quarantine_run,
)
from tasks.uploads.records import MAX_RECORDED_ERRORS, ErrorLog, FileEntry, Mode, display_path, read_jsonl
from tasks.uploads.references import REFERENCE_BATCH, ReferenceChecker, reference_checker, select_unreferenced
from tasks.uploads.remove import RemovalRecord, remove_planned
from tasks.uploads.scan import FOUND_CHUNK, MAX_DEPTH, ScanStats, scan_old_files
from tasks.uploads.scan import _walk_old_files as _walk_old_files  # for tests of the one-pass delete

__all__ = [
    "FOUND_CHUNK",
    "MAX_DEPTH",
    "MAX_RECORDED_ERRORS",
    "PLAN_SUFFIX",
    "PROJECT_DIR",
    "REFERENCE_BATCH",
    "RUN_ID_PATTERN",
    "SYSTEM_DIRECTORIES",
    "TOP_N",
    "CleanupOutcome",
    "DiskUsage",
    "ErrorLog",
    "FileEntry",
    "LockBusy",
    "Mode",
    "PlanInvalid",
    "PlanSummary",
    "PlanWriter",
    "ProtectMatcher",
    "PurgeRecord",
    "QuarantineInvalid",
    "QuarantineRunNotFound",
    "ReferenceCheckFailed",
    "ReferenceChecker",
    "RemovalRecord",
    "RestoreRecord",
    "RootCheck",
    "ScanStats",
    "UploadsError",
    "UploadsRootInvalid",
    "UploadsRootRefused",
    "check_root",
    "check_root_task",
    "clean_uploads",
    "clean_uploads_task",
    "count_plan",
    "disk_usage",
    "disk_usage_task",
    "display_path",
    "iter_plan",
    "latest_quarantine_runs",
    "location_refusal",
    "new_run_id",
    "plan_directory",
    "prepare_quarantine",
    "prepare_quarantine_task",
    "progress_reporter",
    "purge_quarantine",
    "purge_quarantine_task",
    "quarantine_directory",
    "read_jsonl",
    "reference_checker",
    "refuse_location",
    "remove_planned",
    "remove_planned_task",
    "restore_quarantine_run",
    "restore_quarantine_task",
    "run_id_time",
    "scan_old_files",
    "select_unreferenced",
]
