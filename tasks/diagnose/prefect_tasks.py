"""The Prefect tasks of this package, all wrapped here: the plain functions stay callable without
Prefect (tests, other tasks), and a flow submits the wrapped ones. A diagnosis reads the systems
every time, so nothing is cached (as for every ops task)."""

from __future__ import annotations

from tasks.diagnose.runner import run_diagnostic
from tasks.diagnose.wal_checks import wal_archive
from tasks.ops_task import ops_task

run_diagnostic_task = ops_task(run_diagnostic, name="run-diagnostic", task_run_name="diagnose-{name}")
# Only where point-in-time recovery is in use: None otherwise, and the report has no such section.
wal_archive_task = ops_task(wal_archive, name="run-diagnostic", task_run_name="diagnose-wal-archive")
