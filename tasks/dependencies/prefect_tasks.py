"""The Prefect tasks of the dependency-update flow, all wrapped here: the plain functions stay callable
without Prefect (tests, other tasks), and the flow calls the wrapped ones. The wrapper of ``f`` is
``f_task``; the task names are what the UI shows.

Only steps another attempt repeats from scratch are retried, for a registry hiccup: ``npm ci`` (it
removes node_modules first), the audit and ``npm outdated``.
"""

from __future__ import annotations

from tasks.dependencies.advisories import audit
from tasks.dependencies.apply import apply_updates, commit_update, run_tests
from tasks.dependencies.builds import build_image, check_staging_image
from tasks.dependencies.planning import plan_for_scope
from tasks.dependencies.versions import outdated
from tasks.dependencies.working_copy import create_working_copy, install, prune_working_copies
from tasks.ops_task import ops_task

create_working_copy_task = ops_task(create_working_copy, name="create-working-copy")
install_task = ops_task(install, name="npm-ci", retries=1, retry_delay_seconds=5)
audit_task = ops_task(audit, name="npm-audit", retries=2, retry_delay_seconds=5)
outdated_task = ops_task(outdated, name="npm-outdated", retries=2, retry_delay_seconds=5)
plan_for_scope_task = ops_task(plan_for_scope, name="plan-updates")
apply_updates_task = ops_task(apply_updates, name="apply-updates")
run_tests_task = ops_task(run_tests, name="run-app-tests")
commit_update_task = ops_task(commit_update, name="commit-update")
build_image_task = ops_task(build_image, name="build-image")
prune_working_copies_task = ops_task(prune_working_copies, name="prune-working-copies")
check_staging_image_task = ops_task(check_staging_image, name="check-staging-image")
