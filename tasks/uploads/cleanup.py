"""One cleanup: plan, and hand the plan as it streams to the removal (or to the one-pass delete)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tasks.runlog import run_logger
from tasks.settings import PostgresSettings, UploadsSettings
from tasks.uploads.guard import refuse_location
from tasks.uploads.one_pass import _plan_and_delete
from tasks.uploads.plan import PlanSummary, PlanWriter, iter_plan
from tasks.uploads.records import FileEntry, Mode, read_jsonl
from tasks.uploads.references import reference_checker
from tasks.uploads.remove import RemovalRecord, _check_removal_arguments, remove_planned
from tasks.uploads.scan import ScanStats


@dataclass
class CleanupOutcome:
    """A plan and what was done with it."""

    plan: PlanSummary
    removal: RemovalRecord


def clean_uploads(
    uploads: UploadsSettings,
    pg: PostgresSettings | None,
    *,
    root: Path,
    cutoff: float,
    run_id: str,
    plan_path: Path,
    mode: Mode,
    confirm: bool = False,
    quarantine: Path | None = None,
    from_plan: Path | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> CleanupOutcome:
    """Plan the cleanup and hand the plan, as it streams, to :func:`remove_planned`.

    The dry run (``confirm=False``) and the real run go through the same code: the plan is computed,
    written to ``plan_path`` and counted identically; only :func:`remove_planned` acts or not.
    With ``from_plan`` (a plan a dry run wrote and someone reviewed), exactly those files are
    considered instead of a new scan; each is still re-checked before it is touched.

    Raises:
        ReferenceCheckFailed: the database could not be asked (nothing after that point is touched).
        PlanInvalid: ``from_plan`` is unreadable or names paths outside the root.
        UploadsRootRefused: ``root`` is a system, home or project directory (:func:`location_refusal`).
    """
    refuse_location(root)
    stats = ScanStats()
    writer = PlanWriter(plan_path, stats)
    with reference_checker(uploads, pg) as references:
        if from_plan is None and references is None and (not confirm or mode == "delete"):
            # Nothing to ask the database and nothing to move: plan (and delete) in one directory pass.
            _check_removal_arguments(mode, quarantine, run_id)
            removal = _plan_and_delete(
                uploads,
                writer,
                root=root,
                cutoff=cutoff,
                run_id=run_id,
                mode=mode,
                confirm=confirm,
                on_progress=on_progress,
            )
        else:
            if from_plan is not None:
                # Every record is validated before the first file is touched: a bad line deep in a
                # reviewed plan must not stop the run half way.
                for _ in read_jsonl(from_plan):
                    pass
                planned: Iterable[FileEntry] = read_jsonl(from_plan)
            else:
                planned = iter_plan(uploads, references, root=root, cutoff=cutoff, stats=stats)
            removal = remove_planned(
                uploads,
                pg,
                writer.tee(planned),
                root=root,
                mode=mode,
                cutoff=cutoff,
                run_id=run_id,
                confirm=confirm,
                quarantine=quarantine,
                references=references,
                on_progress=on_progress,
            )
    plan = writer.summary(run_id, root, cutoff)
    run_logger(__name__).info(
        "uploads plan %s: %d scanned, %d older than cutoff, %d protected, %d referenced, %d planned",
        run_id,
        stats.scanned_files,
        stats.matched,
        stats.protected,
        stats.referenced,
        stats.planned,
    )
    return CleanupOutcome(plan=plan, removal=removal)
