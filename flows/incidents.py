"""Runbook "Emergency Procedures", and the "Redis out of memory" resolution of Common Issues 2.

- ``outage-triage`` (Total Service Outage): assess every service and check, list what changed
  recently (releases, rollout revisions, migrations), and when a release is recent and the stack is not
  healthy, propose a rollback that an approval turns into a ``rollback-release`` run;
- ``recover-data`` (Data Loss / Corruption): approval, stop writes (scale backend and worker to 0,
  recording their replicas), restore the chosen backup, run the validation queries, scale back to the
  recorded counts (also when a step failed), health check;
- ``security-incident`` (Security Incident): an evidence bundle with a sha256 manifest (always, first),
  then, behind an approval, isolation (external traffic blocked through the runtime, the state before
  recorded), rotation of the secrets the settings name, a rolling restart and a health check, and the
  security patches (update-dependencies with its staging deploy, as a subflow);
- ``end-isolation``: the recorded state before the isolation put back, behind an approval;
- ``flush-redis`` (Redis out of memory): what FLUSHDB would lose (keys by prefix, BullMQ jobs), and the
  FLUSHDB itself only behind an approval, then a worker restart.

Everything destructive is a dry run by default; every flow publishes its report also when it fails.
"""

from __future__ import annotations

import contextlib
import functools
from datetime import datetime
from typing import Any

from prefect import State, flow

from tasks import approvals, incidents, locks, redisdb, reports
from tasks.errors import ParameterError
from tasks.incidents import RollbackProposal, isolation_steps, outage, recovery, security
from tasks.incidents.reports import render_census, render_flush
from tasks.incidents.steps import approval_timeout
from tasks.redisdb import FlushRecord, KeyCensus
from tasks.reports import RunOutcome
from tasks.runlog import run_logger
from tasks.runtime import RuntimeUnavailable, get_runtime
from tasks.settings import OpsSettings, load_settings

# --- Total Service Outage -------------------------------------------------------------------------


def _start_rollback(settings: OpsSettings, proposal: RollbackProposal) -> Any:
    """Run rollback-release as a subflow (its own run in the UI, its own approval pre-given here)."""
    from flows.releases import rollback_release

    return rollback_release(
        environment=settings.runtime.environment,
        release_id=proposal.target_release,
        approved=True,
        timeout_seconds=settings.runtime.ready_timeout_seconds,
    )


@flow(name="outage-triage", log_prints=True)
def outage_triage(
    window_hours: float | None = None,
    approved: bool = False,
    propose_when_healthy: bool = False,
    approval_timeout_seconds: int | None = None,
) -> dict[str, Any]:
    """Runbook "Total Service Outage": assess, check recent changes, offer a rollback.

    1. Assess: every service's status through the runtime, and every health check.
    2. Recent changes: release records (deploys, rollbacks), rollout revisions, migration runs and the
       database's migration revision.
    3. When a release happened within the window and the stack is not healthy, a rollback is proposed;
       an approval (or ``approved``) starts ``rollback-release``, which refuses to cross a
       database migration applied since. If the database is damaged, run ``recover-data``.

    Args:
        window_hours: how recent a release must be to be suspected; default
            ``incidents.release_window_hours`` (2).
        approved: start the rollback without the approval form; refused before anything where
            pre-approval is not allowed (``approvals.allow_preapproved``; by default in production).
        propose_when_healthy: propose a rollback after a recent release even when every check passes.
        approval_timeout_seconds: how long the form waits; default ``incidents.approval_timeout_seconds``.

    Returns:
        The outcome (``no-recent-release``, ``rollback-declined``, ``rolled-back``...), the health status,
        the recent changes, the proposal and the approval (who, when, why; or why not).

    Raises:
        ParameterError: a bad parameter, or ``approved`` where pre-approval is not allowed.
    """
    settings = load_settings()
    tri = outage.start(
        settings,
        approved=approved,
        window_hours=window_hours,
        approval_timeout_seconds=approval_timeout_seconds,
        propose_when_healthy=propose_when_healthy,
    )
    with reports.publishing(RunOutcome(), tri.publish, settings) as run:
        outage.assess(tri, get_runtime(settings))
        if outage.review_changes(tri) is None:
            run.outcome = "healthy" if tri.healthy else "no-recent-release"
        else:
            outage.offer_rollback(
                tri, run, approved=approved, start_rollback=functools.partial(_start_rollback, settings)
            )
        return tri.result(run.outcome)


# --- Data Loss / Corruption -----------------------------------------------------------------------


@flow(name="recover-data", log_prints=True)
def recover_data(
    backup_id: str | None = None,
    dry_run: bool = True,
    approved: bool = False,
    target_database: str | None = None,
    stop_writes: bool = True,
    candidates: int = 10,
    approval_timeout_seconds: int | None = None,
    validation_queries: list[str] | None = None,
    target_time: datetime | None = None,
    target_lsn: str | None = None,
    target_xid: int | None = None,
    tables: list[str] | None = None,
) -> dict[str, Any]:
    """Runbook "Data Loss / Corruption": stop writes, restore, verify, resume.

    1. Assess: candidate backups with their verification state and times and the restore plan (or,
       given a point in time, the point-in-time plan: target checked against the restorable window,
       every WAL segment checked), the replicas of the services that write
       (``incidents.stop_services``, default backend and worker).
    2. Approval (or ``approved``, refused before anything where pre-approval is not allowed); the
       form can name another backup.
    3. Stop all writes: read the replica counts again (they may have changed while the approval
       waited), then scale those services to 0.
    4. Restore: the backup into a scratch database, proven equal to its manifest, swapped in
       atomically; or the WAL replayed to the point in a scratch PostgreSQL, copied into a new
       database, proven equal to the replay, swapped in (with ``tables``: only those tables, into a
       side schema of the live database). The replaced database is always kept as
       ``<db>__old_<time>`` (read-only by default); nothing is dropped.
    5. Verify data integrity: this incident's ``validation_queries``, else the default set of
       ``incidents.validation_queries``; the plan and the report show which, and where they came from.
    6. Resume service: scale back to the counts read in step 3, also when step 3, 4 or 5 failed; wait
       ready.
    7. Health check (also after a failed validation, whose message then says what to do next: undo
       with restore-database ``swap_back``, or another backup or point).

    Args:
        backup_id: an id, ``latest`` or ``latest-verified`` (the newest backup that passed a restore
            drill); default ``latest-verified`` when no point in time is given.
        dry_run: only report the plan (the default); nothing is stopped or restored.
        approved: pre-approve instead of the approval form (drills, staging); refused where
            pre-approval is not allowed (``approvals.allow_preapproved``; by default in production).
        target_database: the database to replace; default the application's (``OPS_POSTGRES__DSN``).
            The backup must be of that database.
        stop_writes: scale the writers to 0 during the restore; false when the application is stopped
            by other means (``runtime.kind = none``), or for a per-table restore that leaves the live
            tables alone.
        candidates: how many backups the report lists.
        approval_timeout_seconds: how long the form waits; default ``incidents.approval_timeout_seconds``.
        validation_queries: read-only SQL checks for this incident (each passes when its first column
            is true, not NULL, not 0); default ``incidents.validation_queries``.
        target_time: recover the database as it was at this moment (with its zone) from the WAL
            archive instead of a backup, e.g. one second before the damage.
        target_lsn: or as it was at this WAL position.
        target_xid: or as it was just before transaction X (e.g. the bad DELETE's) committed.
        tables: with a point in time, bring back only these tables into a side schema
            ``restored_<time>``; the report gives the SQL to compare and copy back.

    Returns:
        The outcome, the source restored, the replica counts, the validation results and the step
        timings.

    Raises:
        ParameterError: an empty validation query, ``candidates`` under 1, a backup and a point in
            time both given, or ``approved`` where pre-approval is not allowed; nothing was done.
        TargetOutsideWindow: the point is in the future or outside the restorable window (the
            message gives the window); nothing was done.
        ApprovalRejected: rejected or timed out; nothing was changed (the report's outcome is
            "not applied: ...").
        LockBusy: another run recovers, restores or migrates the database (on any worker; it is named);
            nothing was changed.
        CheckFailed: a validation query failed (the message names the kept database, the undo, the other
            backups and the health after), or the stack is unhealthy afterwards (services were scaled
            back either way).
    """
    settings = load_settings()
    source = recovery.Source(backup_id, target_time, target_lsn, target_xid, tables)
    rec = recovery.start(
        settings,
        source,
        approved=approved,
        target_database=target_database,
        candidates=candidates,
        approval_timeout_seconds=approval_timeout_seconds,
        validation_queries=validation_queries,
    )
    held = contextlib.ExitStack()

    def publish(run: RunOutcome) -> None:
        held.close()
        rec.publish(run)

    with reports.publishing(
        RunOutcome(), publish, settings, running=("started", "waiting for approval")
    ) as run:
        if not dry_run:
            held.enter_context(recovery.database_lock(rec))
        runtime = get_runtime(settings)
        services = settings.incidents.stop_services or settings.runtime.services
        recovery.assess(rec, runtime, services, stop_writes=stop_writes)
        if dry_run:
            run.outcome = "dry run (plan only)"
            return recovery.plan_result(rec)
        recovery.approve(rec, run, approved=approved)
        validation_error = recovery.stop_restore_resume(rec, runtime, services)
        recovery.check_health(rec, run, validation_error)
        return rec.result("recovered")


# --- Security Incident ----------------------------------------------------------------------------


def _update_dependencies(deploy_to_staging: bool) -> State[dict[str, Any]]:
    """Runbook "Security Incident" step 4: update-dependencies with scope ``security`` as a subflow,
    which builds the patched image and deploys it to staging through deploy-release (rolled back
    there on failure)."""
    from flows.dependencies import update_dependencies

    return update_dependencies(
        scope="security", deploy_to_staging=deploy_to_staging, build=True, return_state=True
    )


@flow(name="security-incident", log_prints=True)
def security_incident(
    dry_run: bool = True,
    approved: bool = False,
    rotate: list[str] | None = None,
    restart: bool = True,
    approval_timeout_seconds: int | None = None,
    isolate: bool = False,
    isolate_services: list[str] | None = None,
    patch_and_redeploy: bool = False,
) -> dict[str, Any]:
    """Runbook "Security Incident": collect evidence, isolate, rotate all secrets, patch and redeploy.

    1. Collect evidence (always, also on a dry run, and before anything changes): every service's
       logs, ``pg_stat_activity``, the roles, Redis clients, resource usage, rollout and release
       history, the health report, into a timestamped bundle in the storage with a sha256 manifest;
       the bundle is re-read and verified.
    2. Plan: the isolation (``isolate``: what blocking external traffic changes, from what runs now),
       and the rotation of what ``incidents.rotate_roles`` and ``incidents.app_secrets`` name (or the
       ``rotate`` subset), checking that each role, env file and Secret exists.
    3. Approval (or ``approved``) of the whole plan; then:
       - isolate affected systems: on Kubernetes a NetworkPolicy (labelled) admitting ingress to the
         pods only from the namespace's own pods, policies that would still let outside traffic in
         limited for the time; on Compose the public entry service (the reverse proxy,
         ``runtime.compose.public_entry_services``) stopped. The state before is recorded under
         ``runtime.state_dir/isolation/`` (who, when, what) before anything changes; ``end-isolation``
         puts it back;
       - rotate: role passwords (``ALTER ROLE``), app secrets in the Compose env file or the Kubernetes
         Secret, all or nothing.
    4. Redeploy: a rolling restart of ``incidents.restart_services`` (default every service; never one
       the isolation stopped) so the new secrets are read, then a health check; with
       ``patch_and_redeploy``, ``update-dependencies`` with scope ``security`` as a subflow, which
       builds the patched image and deploys it to staging through ``deploy-release``; the report
       links those runs.

    New secrets are never logged, returned or published: reports show names and fingerprints only.

    Args:
        dry_run: collect evidence and show the plans only (the default).
        approved: act without the approval form; refused before anything (the evidence too) where
            pre-approval is not allowed (``approvals.allow_preapproved``; by default in production).
        rotate: names of roles / app secrets to rotate; default all configured.
        restart: restart the services after rotating (they keep old secrets until they do).
        approval_timeout_seconds: how long the form waits; default ``incidents.approval_timeout_seconds``.
        isolate: block external traffic after the evidence is taken (reversible with end-isolation).
        isolate_services: the services to cut off (Kubernetes Deployments whose pods get the policy;
            Compose services to stop); default every pod of the namespace / the public entry services.
        patch_and_redeploy: after the rotation, run update-dependencies (scope security) and its staging
            deploy. When these settings do not point at staging, the patched image is built only.

    Returns:
        The evidence bundle (prefix, manifest sha256, files), the isolation (plan, record, changes), the
        rotation record (names, fingerprints) and the patch runs (links, outcome).

    Raises:
        EvidenceTampered: the bundle did not verify right after it was written.
        ParameterError: a bad parameter, or ``approved`` where pre-approval is not allowed.
        RuntimeOperationFailed: a service to isolate does not exist (before the evidence), or the
            isolation did not take effect (its record stays: run end-isolation).
        RuntimeUnavailable: isolate with no runtime to isolate on (``runtime.kind`` none).
        IsolationInForce: an isolation is recorded and the runtime no longer matches it; end it first.
        RotationRefused: the plan has problems; nothing was rotated (evidence is kept).
        ApprovalRejected: the plan was rejected or timed out (evidence is kept; nothing was changed;
            the report's outcome is "not applied: ...").
        LockBusy: another run rotates this stack's secrets or isolates it (on any worker; it is named);
            nothing was changed.
        CheckFailed: unhealthy after the rotation, or update-dependencies failed (the report links it).
    """
    settings = load_settings()
    inc = security.start(
        settings,
        approved=approved,
        rotate=rotate,
        restart=restart,
        approval_timeout_seconds=approval_timeout_seconds,
        isolate=isolate,
        isolate_services=isolate_services,
        patch_and_redeploy=patch_and_redeploy,
    )
    held = contextlib.ExitStack()

    def publish(run: RunOutcome) -> None:
        held.close()
        inc.publish(run)

    with reports.publishing(
        RunOutcome(), publish, settings, running=("started", "waiting for approval")
    ) as run:
        runtime = get_runtime(settings)
        security.collect_evidence(inc, runtime)
        security.plan(inc, runtime)
        if dry_run:
            security.dry_run(inc, run)
        elif not inc.acting:
            run.outcome = "evidence collected; nothing configured to rotate"
        else:
            security.hold_locks(inc, held)
            security.approve(inc, run, approved=approved)
            security.isolate(inc, runtime, run)
            security.rotate_and_restart(inc, runtime, run)
            security.patch_and_redeploy(inc, run, _update_dependencies)
        return inc.result(run.outcome)


@flow(name="end-isolation", log_prints=True)
def end_isolation(
    dry_run: bool = True,
    approved: bool = False,
    approval_timeout_seconds: int | None = None,
) -> dict[str, Any]:
    """Runbook "Security Incident", step 1 undone: end the isolation security-incident recorded.

    1. Read the isolation record (``runtime.state_dir/isolation/<stack>-<environment>.json``: who
       isolated, when, the evidence bundle, and the state before); none is a clear refusal.
    2. Dry run (the default): show what would be put back.
    3. Approval (or ``approved``); then put back exactly the recorded state: on Kubernetes the
       isolation NetworkPolicies deleted and every policy it limited restored as recorded; on Compose
       the stopped entry services started again (to their recorded container count), waited ready.
       Read back and compared with the record; the record moves to ``isolation/ended/``.
    4. Health check.

    Args:
        dry_run: only show what would be put back (the default).
        approved: act without the approval form; refused before anything where pre-approval is not
            allowed (``approvals.allow_preapproved``; by default in production).
        approval_timeout_seconds: how long the form waits; default ``incidents.approval_timeout_seconds``.

    Returns:
        The outcome, the record (who, when, what), the changes, where the record went, the health.

    Raises:
        IsolationNotRecorded: no isolation is recorded for the stack and environment; nothing changed.
        ParameterError: ``approved`` where pre-approval is not allowed.
        ApprovalRejected: rejected or timed out; nothing was changed.
        LockBusy: another run isolates this stack or ends its isolation (it is named); nothing changed.
        RuntimeOperationFailed: the recorded state could not be put back (the record stays in force).
        CheckFailed: the stack is unhealthy afterwards (the isolation is ended all the same).
    """
    settings = load_settings()
    ending = isolation_steps.start_ending(
        settings, approved=approved, approval_timeout_seconds=approval_timeout_seconds
    )
    held = contextlib.ExitStack()

    def publish(run: RunOutcome) -> None:
        held.close()
        ending.publish(run)

    with reports.publishing(
        RunOutcome(), publish, settings, running=("started", "waiting for approval")
    ) as run:
        runtime = get_runtime(settings)
        if not dry_run:
            held.enter_context(isolation_steps.isolation_lock(settings, "end-isolation"))
        end = isolation_steps.read_record(ending, runtime)
        if dry_run:
            run.outcome = f"dry run: would put back {len(end.record.plan.undo)} thing(s)"
        else:
            isolation_steps.approve_ending(ending, run, approved=approved)
            isolation_steps.put_back(ending, runtime, run)
            isolation_steps.check_health_after(ending, run)
        return ending.result(run.outcome)


# --- Redis out of memory --------------------------------------------------------------------------


@flow(name="flush-redis", log_prints=True)
def flush_redis(
    dry_run: bool = True,
    approved: bool = False,
    restart_services: list[str] | None = None,
    depth: int | None = None,
    approval_timeout_seconds: int | None = None,
) -> dict[str, Any]:
    """Runbook Common Issues 2 "If Redis out of memory": FLUSHDB, then restart the worker.

    Shows what FLUSHDB would lose first: key counts by name prefix (SCAN with COUNT, never KEYS) and
    each BullMQ queue's jobs by state. FLUSHDB runs only with ``dry_run=false`` and after an approval
    (or ``approved``), on the configured db only; then the worker is restarted so it re-creates its
    queue keys. Prefer clean-jobs (old completed/failed jobs) when that frees enough memory.

    Args:
        dry_run: only show the census (the default).
        approved: flush without the approval form; refused before anything where pre-approval is
            not allowed (``approvals.allow_preapproved``; by default in production).
        restart_services: services restarted after the flush; default ``["worker"]``.
        depth: key name segments grouped in the census; default ``incidents.key_census_depth``.
        approval_timeout_seconds: how long the form waits; default ``incidents.approval_timeout_seconds``.

    Returns:
        The census (keys by prefix, jobs) and the flush record.

    Raises:
        ParameterError: a bad parameter, or ``approved`` where pre-approval is not allowed.
        ApprovalRejected: rejected or timed out; nothing was deleted (the report's outcome is
            "not applied: ...").
        LockBusy: another run flushes this Redis db (on any worker; it is named); nothing was deleted.
    """
    settings = load_settings()
    approvals.check_preapproval(settings, approved)
    timeout = approval_timeout(settings, approval_timeout_seconds)
    if depth is not None and not 1 <= depth <= 5:
        raise ParameterError("depth must be between 1 and 5")
    services = restart_services if restart_services is not None else ["worker"]
    logger = run_logger(__name__)
    key = f"flush-redis-{settings.stack}"
    census: KeyCensus | None = None
    record: FlushRecord | None = None
    restarted: list[str] = []
    approval = ""
    held = contextlib.ExitStack()

    def publish(run: RunOutcome) -> None:
        held.close()
        reports.publish_markdown(
            key,
            render_flush(settings.stack, run.outcome, census, record, approval),
            f"Redis FLUSHDB: {run.outcome}",
        )
        if census is not None:
            reports.publish_table(
                f"{key}-keys", [{"prefix": p, "keys": n} for p, n in census.groups], "Keys by prefix"
            )

    with reports.publishing(
        RunOutcome(), publish, settings, running=("started", "waiting for approval")
    ) as run:
        if not dry_run:
            held.enter_context(
                locks.exclusive(
                    settings,
                    locks.flushdb_lock_name(settings),
                    operation="flush-redis",
                    what=f"a FLUSHDB of Redis {settings.redis.masked_url}",
                )
            )
        census = redisdb.key_census_task(settings, depth=depth)
        if dry_run:
            record = redisdb.flush_redis_db_task(settings, census, confirm=False)
            run.outcome = f"dry run, {census.dbsize} keys would be deleted"
        else:
            if not approved:
                run.outcome = "waiting for approval"
                reports.publish_markdown(
                    key, render_flush(settings.stack, run.outcome, census, None), run.outcome
                )
            approval = approvals.request_approval(
                settings,
                approved=approved,
                action=f"run FLUSHDB on db {census.db} ({census.dbsize} keys)",
                plan_markdown=f"FLUSHDB deletes every key of db {census.db}:\n\n" + render_census(census),
                timeout_seconds=timeout,
            )[0].describe()
            record = redisdb.flush_redis_db_task(settings, census, confirm=True)
            run.outcome = f"flushed {record.keys_before} keys"
            if services:
                try:
                    runtime = get_runtime(settings)
                    changes = incidents.restart_services_task(runtime, services)
                    restarted = [c.target for c in changes]
                except RuntimeUnavailable as exc:
                    logger.warning("worker not restarted: %s", exc)
                    run.outcome += f"; restart {', '.join(services)} yourself ({exc})"
        return {
            "outcome": "dry-run" if dry_run else "flushed",
            "db": census.db,
            "keys": census.dbsize,
            "groups": dict(census.groups),
            "jobs": {q.name: q.counts for q in census.queues},
            "flushed": record is not None and not record.dry_run,
            "keys_after": None if record is None else record.keys_after,
            "restarted": restarted,
            "approval": approval or None,
        }
