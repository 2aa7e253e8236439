"""Runbook: "Rollback if recent deployment" (Total Service Outage) and the CI staging deploy
("Deploy to staging first, then production"), on whichever runtime the settings name.

``deploy_release`` is what CI runs: it records the release running now, sets the new images, waits
until ready, checks health and smoke URLs, and on any failure rolls back to the recorded release,
checks health again and ends Failed saying why. ``rollback_release`` is the operator's rollback: plan
(from -> to per service), approval, apply, verify; it refuses to cross a database migration unless
forced.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Sequence
from typing import Any, Literal

from prefect import flow
from prefect.context import FlowRunContext

from tasks import approvals, locks, releases, reports
from tasks.errors import ApprovalRejected, CheckFailed, LockBusy, OpsError, ParameterError, SettingsError
from tasks.health import HealthReport
from tasks.migrate import WritesPolicy, plan_writer_stop
from tasks.releases import (
    Readiness,
    ReleaseNotFound,
    ReleaseRecord,
    ReleaseStatus,
    ReleaseStore,
    RollbackStep,
)
from tasks.rollout import (
    apply_rollback,
    health_lines,
    histories,
    list_services,
    migration_revision,
    rollout_sections,
    set_images,
    wait_until_ready,
)
from tasks.runlog import run_logger
from tasks.runtime import (
    ChangeRecord,
    Runtime,
    ServicesNotReady,
    ServiceStatus,
    check_image_reference,
    check_image_tag,
    get_runtime,
    image_with_tag,
)
from tasks.settings import OpsSettings, load_settings


class DeployFailed(OpsError):
    """The deploy failed: rolled back, or nothing was switched (the message says which), or the
    rollback failed too."""


class DeployNotApplied(DeployFailed):
    """The deploy was refused before any service was switched (its migration was refused)."""


class MigrationRefused(OpsError):
    """The deploy's migration was refused or not approved: nothing was migrated or switched."""


# A migration that stops with one of these applied nothing: the deploy is "not applied", not rolled back.
_MIGRATION_REFUSALS = (SettingsError, ParameterError, ApprovalRejected, LockBusy)


def _flow_run_id() -> str | None:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


def _rollback_to(
    runtime: Runtime,
    settings: OpsSettings,
    target_images: dict[str, str],
    timeout: float,
    scope: releases.VerificationScope,
    smoke_urls: list[str],
) -> tuple[list[RollbackStep], list[ChangeRecord], list[ServiceStatus], Readiness | None, list[str]]:
    """Plan, apply, wait and verify a return to ``target_images``; failures are returned, not raised."""
    services = list(target_images)
    steps = releases.plan_rollback(list_services(runtime), target_images, histories(runtime, services))
    records = apply_rollback(runtime, steps) if any(s.changes for s in steps) else []
    try:
        ready = wait_until_ready(runtime, settings, services, timeout, scope, smoke_urls)
    except ServicesNotReady as exc:
        return steps, records, exc.statuses, None, [str(exc)]
    return steps, records, ready.statuses, ready, ready.failures


def _switched(
    runtime: Runtime, records: Sequence[ChangeRecord], before: dict[str, str | None], services: Sequence[str]
) -> bool:
    """Whether a failed deploy changed any service: a change record says so, or the runtime shows
    another image than before. When the runtime cannot be read, assume it did (and roll back)."""
    if any(record.changed for record in records):
        return True
    try:
        live = {s.name: s.image for s in runtime.list_services()}
    except Exception:
        return True
    return any(live.get(service) != before.get(service) for service in services)


def _run_migration(approved: bool, writes_policy: str) -> str:
    """The migrations flow as a subflow when this installation has it; a report line either way.

    Raises:
        MigrationRefused: the migration refused to start or was not approved (nothing was applied).
    """
    try:
        module = importlib.import_module("flows.migrate")
    except ImportError:
        return "Migration: skipped (flows.migrate is not installed here)."
    migrate = module.migrate_database
    accepted = inspect.signature(migrate.fn).parameters
    wanted = {"dry_run": False, "approved": approved, "writes_policy": writes_policy}
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    try:
        result = migrate(**kwargs)
    except _MIGRATION_REFUSALS as exc:
        raise MigrationRefused(f"the migration was refused: {exc}") from exc
    if isinstance(result, dict):
        writers = result.get("writers") or {}
        how = writers.get("policy") if isinstance(writers, dict) else None
        return (
            f"Migration: {result.get('outcome', 'done')} (writes_policy={how or writes_policy};"
            " see the migrate-database run)."
        )
    return f"Migration: done ({result if isinstance(result, str) else 'see the migrate-database run'})."


def check_release_input(image_tag: str | None, images: dict[str, str] | None) -> None:
    """``image_tag`` and every image of ``images`` follow the OCI reference grammar.

    Raises:
        ParameterError: one does not (``1.0;id``, ``$(id)``, ``-rf``, a newline...); nothing was done.
    """
    if not image_tag and not images:
        raise ParameterError("give image_tag (one tag for every service) or images (service -> image)")
    problems = []
    if image_tag is not None:
        try:
            check_image_tag(image_tag)
        except ValueError as exc:
            problems.append(f"image_tag: {exc}")
    for service, image in (images or {}).items():
        try:
            check_image_reference(image)
        except ValueError as exc:
            problems.append(f"images[{service!r}]: {exc}")
    if problems:
        raise ParameterError("; ".join(problems) + ". Nothing was done.")


def _target_images(
    current: dict[str, str | None],
    services: Sequence[str],
    image_tag: str | None,
    images: dict[str, str] | None,
) -> dict[str, str]:
    """service -> image of the new release; bad input raises ParameterError before any change."""
    if not image_tag and not images:
        raise ParameterError("give image_tag (one tag for every service) or images (service -> image)")
    images = dict(images or {})
    unknown = [s for s in images if s not in services]
    if unknown:
        raise ParameterError(
            f"images names unknown service(s) {', '.join(unknown)}; the services are {', '.join(services)}"
        )
    target = {}
    for service in services:
        if service in images:
            target[service] = images[service]
            continue
        if not image_tag:
            continue
        now = current.get(service)
        if not now:
            raise ParameterError(
                f"service {service} runs no image now, so image_tag cannot be applied to it; pass images"
            )
        try:
            target[service] = image_with_tag(now, image_tag)
        except ValueError as exc:
            raise ParameterError(str(exc)) from None
    return target


def _release_table(records: Sequence[ReleaseRecord]) -> str:
    rows = [
        [
            r.id,
            r.kind,
            r.status,
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            ", ".join(f"{s}={i}" for s, i in r.images.items()),
            r.migration_revision,
        ]
        for r in records
    ]
    return reports.markdown_table(["release", "kind", "status", "created (UTC)", "images", "migration"], rows)


def _check_environment(settings: OpsSettings, environment: str, timeout_seconds: float) -> None:
    """The environment is the one these settings point at, and the timeout is positive.

    Raises:
        ParameterError: either is not; nothing was done.
    """
    if environment != settings.runtime.environment:
        raise ParameterError(
            f"environment {environment!r} does not match these settings (runtime.environment ="
            f" {settings.runtime.environment!r}); run the deployment configured for {environment}."
            " Nothing was changed."
        )
    if timeout_seconds <= 0:
        raise ParameterError(f"timeout_seconds must be positive, not {timeout_seconds}")


def _release_lock(
    settings: OpsSettings, environment: str, operation: str
) -> contextlib.AbstractContextManager[object]:
    """One deploy or rollback of an environment at a time, on every worker."""
    return locks.exclusive(
        settings,
        locks.release_lock_name(settings, environment),
        operation=operation,
        what=f"a deploy or rollback of {environment}",
    )


def _publish_release_report(key: str, description: str, store: ReleaseStore, lines: Sequence[str]) -> None:
    """A deploy or rollback report: its own sections, then the environment's recent releases."""
    body = [*lines, "", "## Recent releases", "", _release_table(store.all()[-10:])]
    reports.publish_markdown(key, "\n".join(body), description)


@flow(name="deploy-release", log_prints=True)
def deploy_release(
    environment: str = "staging",
    image_tag: str | None = None,
    images: dict[str, str] | None = None,
    migrate: bool = False,
    timeout_seconds: float = 300,
    smoke_urls: list[str] | None = None,
    health_scope: Literal["full", "services"] = "full",
    approved: bool = False,
    writes_policy: WritesPolicy = "stop",
) -> dict[str, Any]:
    """CI staging deploy (runbook "Deploy to staging first, then production"), with auto-rollback.

    1. Preflight: the environment is the one these settings point at; the new images are computed
       (``image_tag`` applied to every service's current image, ``images`` per service).
    2. Record the release running now (the rollback target) with the database migration revision.
    3. Optional migration through the migrate-database flow (``migrate``).
    4. Set the images and wait until ready: the runtime's own readiness (rollout status, Docker
       healthchecks), then the health check and the smoke URLs polled until they pass, all within
       ``timeout_seconds``; the report shows how long each took.
    5. Any failure after a service was switched: roll back to the recorded release (undo to the kept
       revision, or set the old images), wait the same way, and end Failed with the reason and the
       rollback's outcome. A failure before any switch (a missing image) ends Failed saying that
       nothing was switched.

    CI: ``prefect deployment run 'deploy-release/staging' -p image_tag=1.4.2 --watch`` exits 0 only
    when this run completed.

    Args:
        environment: must equal ``runtime.environment`` of the settings (a guard against deploying to
            the wrong stack); also names the release store.
        image_tag: one tag for every service (``backend:1.4.1`` -> ``backend:1.4.2``), or a digest
            (``sha256:...``); checked against the OCI grammar (``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``).
        images: service -> full image reference (``registry:5000/team/app:1.4.2``, ``...@sha256:...``),
            checked against the OCI reference grammar; wins over ``image_tag`` for those services.
        migrate: run the database migration (migrate-database flow) before switching images.
        timeout_seconds: readiness timeout (runtime readiness plus health polling), for the deploy and
            again for a rollback.
        smoke_urls: URLs that must answer 2xx (added to ``runtime.smoke_urls``).
        health_scope: ``full`` health check, or ``services`` (the app's endpoints only).
        approved: pre-approve the migration (CI, staging; refused where pre-approval is not allowed,
            by default in production); otherwise the migration waits for its approval form.
        writes_policy: how the migration treats the application's writers, passed to migrate-database:
            ``stop`` (default: maintenance mode, or the writing services scaled to 0 for the window;
            refused, before anything, when neither is configured) or ``keep-running``.

    Returns:
        The release record (id, images, migration revision, status) and the health report.

    Raises:
        ParameterError: bad input (a tag or image outside the OCI reference grammar, an unknown
            service...); nothing was changed.
        DeployNotApplied: ``migrate`` and the migration was refused (nothing stops the writers under
            ``writes_policy=stop``, approval rejected, lock busy); no service was switched.
        DeployFailed: the deploy failed; the message says why and whether the rollback restored health.
        LockBusy: another deploy or rollback of the environment runs (on any worker; it is named);
            nothing was changed.
    """
    settings = load_settings()
    logger = run_logger(__name__)
    _check_environment(settings, environment, timeout_seconds)
    check_release_input(image_tag, images)
    if migrate:
        approvals.check_preapproval(settings, approved)
    services = list(settings.runtime.services)
    urls = list(smoke_urls or []) + list(settings.runtime.smoke_urls)
    runtime = get_runtime(settings)
    store = ReleaseStore.from_settings(settings, environment)
    lines: list[str] = []
    release: ReleaseRecord | None = None
    baseline: ReleaseRecord | None = None
    before: list[ServiceStatus] = []
    after: list[ServiceStatus] = []
    report: HealthReport | None = None
    readiness: Readiness | None = None
    rollback_readiness: Readiness | None = None
    records: list[ChangeRecord] = []

    def publish(run: reports.RunOutcome) -> None:
        body = [
            f"# Deploy to {environment} on {runtime.kind}: **{run.outcome}**",
            "",
            f"Release: {release.label if release else 'not recorded'}",
            "",
            *([f"**Why:** {run.failure}", ""] if run.failure else []),
            *lines,
            "",
            *rollout_sections(before=before, records=records, after=after, readiness=readiness),
            *(
                ["## Readiness after the rollback", "", *rollback_readiness.lines(), ""]
                if rollback_readiness
                else []
            ),
            *health_lines(report),
        ]
        _publish_release_report(
            f"deploy-release-{environment}", f"Deploy to {environment}: {run.outcome}", store, body
        )

    # A failed deploy records its outcome and reason (rolled back, or nothing switched) before it
    # raises DeployFailed; any other error is recorded by publishing. The lock is released first.
    with (
        reports.publishing(reports.RunOutcome(), publish, settings, reported=(DeployFailed,)) as run,
        contextlib.ExitStack() as lock,
    ):
        if migrate:
            # Refused here, before the lock, the release store or any service is touched.
            try:
                plan_writer_stop(settings, writes_policy)
            except (SettingsError, ParameterError) as exc:
                run.outcome = "not applied"
                lines.append(f"**Not applied:** the migration would be refused: {exc}")
                raise DeployNotApplied(
                    f"not applied: the migration would be refused: {exc}. No service was switched."
                ) from exc
        lock.enter_context(_release_lock(settings, environment, "deploy-release"))
        before = [s for s in list_services(runtime) if s.name in services]
        current = {s.name: s.image for s in before}
        target = _target_images(current, services, image_tag, images)
        # The release running now is the rollback target: record it unless it is the last one recorded.
        revision = migration_revision(settings)
        latest = store.latest_good()
        running = {s: i for s, i in current.items() if i and s in target}
        if latest is None or any(latest.images.get(s) != i for s, i in running.items()):
            baseline = store.record(
                kind="baseline",
                status="recorded",
                images=running,
                migration_revision=revision.revision,
                migration_note=revision.source,
                runtime=runtime.kind,
                flow_run_id=_flow_run_id(),
                note="what ran before this deploy",
            )
        else:
            baseline = latest
        release = store.record(
            kind="deploy",
            status="deploying",
            images=target,
            migration_revision=revision.revision,
            migration_note=revision.source,
            runtime=runtime.kind,
            flow_run_id=_flow_run_id(),
            previous_id=baseline.id,
        )
        lines.append(f"Recorded the running release {baseline.label} as the rollback target.")
        try:
            if migrate:
                lines.append(_run_migration(approved, writes_policy))
                revision = migration_revision(settings)
            records = set_images(runtime, target)
            try:
                readiness = wait_until_ready(
                    runtime, settings, list(target), timeout_seconds, health_scope, urls
                )
            except ServicesNotReady as exc:
                after = exc.statuses
                raise
            after, report = readiness.statuses, readiness.report
            if readiness.failures:
                raise CheckFailed(
                    f"health check after the deploy failed (still failing after {timeout_seconds:g}s):"
                    f" {'; '.join(readiness.failures)}"
                )
        except Exception as exc:
            reason = str(exc)
            release = store.update(release, status="failed", note=reason[:2000])
            if not _switched(runtime, records, current, list(target)):
                # Nothing to roll back: saying "rolled back ... health is back" would be untrue.
                release = store.update(release, status="not-switched")
                after = [s for s in list_services(runtime) if s.name in services]
                if isinstance(exc, MigrationRefused):
                    run.outcome = "not applied"
                    lines += ["", f"**Not applied:** {reason}", "", "No service was switched."]
                    raise DeployNotApplied(f"not applied: {reason}. No service was switched.") from exc
                if migrate and revision.revision != baseline.migration_revision:
                    lines.append(
                        f"The migration was applied: the database is at {revision.revision!r} (the running"
                        f" release ran at {baseline.migration_revision!r})."
                    )
                run.outcome = "failed, nothing switched"
                lines += [
                    "",
                    f"**Deploy failed before any service was switched:** {reason}",
                    "",
                    f"Nothing was switched: the services still run {baseline.label}; no rollback was needed.",
                ]
                logger.error("deploy of %s failed before any switch: %s", release.id, reason)
                raise DeployFailed(
                    f"deploy of {release.id} failed and nothing was switched (the services still run"
                    f" {baseline.id}; no rollback was needed): {reason}"
                ) from exc
            lines += ["", f"**Deploy failed:** {reason}", "", f"Rolling back to {baseline.label}."]
            if migrate and revision.revision != baseline.migration_revision:
                lines.append(
                    f"The database stays at migration {revision.revision!r} (the release ran at"
                    f" {baseline.migration_revision!r}): images are rolled back, the schema is not."
                )
            logger.error("deploy of %s failed: %s; rolling back to %s", release.id, reason, baseline.id)
            try:
                steps, undo, after, rollback_readiness, failures = _rollback_to(
                    runtime, settings, baseline.images, timeout_seconds, health_scope, urls
                )
                report = rollback_readiness.report if rollback_readiness else None
            except Exception as rollback_error:
                steps, undo, failures = [], [], [f"the rollback itself failed: {rollback_error}"]
            records += undo
            lines += ["", "## Rollback plan", "", *[f"- {s.describe()}" for s in steps]]
            if failures:
                release = store.update(
                    release, note=f"{reason[:1500]} | rollback unhealthy: {'; '.join(failures)}"
                )
                run.outcome = "failed, rollback unhealthy"
                raise DeployFailed(
                    f"deploy of {release.id} failed ({reason}); the rollback to {baseline.id} did not restore"
                    f" health either: {'; '.join(failures)}. Run the diagnose flow now."
                ) from exc
            release = store.update(release, status="rolled-back")
            run.outcome = "failed, rolled back"
            raise DeployFailed(
                f"deploy of {release.id} failed and was rolled back to {baseline.id} (health is back):"
                f" {reason}"
            ) from exc
        release = store.update(release, status="succeeded", migration_revision=revision.revision)
        run.outcome = "succeeded"
        logger.info("release %s is live: %s", release.id, release.images)
        return {
            "release": release.model_dump(mode="json"),
            "previous_release": baseline.id,
            "health": report.as_runbook() if report else None,
            "readiness": readiness.as_dict() if readiness else None,
        }


def _choose_target(
    store: ReleaseStore,
    runtime: Runtime,
    current: dict[str, str | None],
    services: list[str],
    release_id: str | None,
) -> tuple[dict[str, str], ReleaseRecord | None, str]:
    """The images to return to, the release record behind them (None for runtime revisions), a label."""
    if release_id:
        chosen = store.get(release_id)
        return dict(chosen.images), chosen, chosen.label
    running = {s: i for s, i in current.items() if i}
    record = store.previous_good(running)
    if record is not None:
        return dict(record.images), record, record.label
    # No recorded release to return to: the runtime's own history (Kubernetes ReplicaSets).
    target = {}
    for service in services:
        earlier = [r for r in runtime.history(service) if not r.current and r.images]
        if earlier:
            image = next(iter(earlier[-1].images.values()))
            if image != current.get(service):
                target[service] = image
    if not target:
        raise ReleaseNotFound(
            f"no earlier release is recorded for {store.environment} and the runtime keeps no earlier"
            " revision: there is nothing to roll back to. Deploy a known-good tag with deploy-release."
        )
    return target, None, "the previous runtime revision of each service"


@flow(name="rollback-release", log_prints=True)
def rollback_release(
    environment: str = "staging",
    release_id: str | None = None,
    approved: bool = False,
    force: bool = False,
    timeout_seconds: float = 300,
    health_scope: Literal["full", "services"] = "full",
    approval_timeout_seconds: int = 3600,
) -> dict[str, Any]:
    """Runbook "Total Service Outage" step 3, "Rollback if recent deployment".

    1. Target: ``release_id``, or the newest recorded release that ran healthy and differs from what
       runs now (on Kubernetes with no recorded release: each Deployment's previous revision).
    2. Guard: refuse (unless ``force``) when a database migration was applied since the target
       release ran, naming it: the old code may not work with the new schema.
    3. Plan: from -> to for each service (rollout undo to a kept revision, or set image), published.
    4. Approval in the UI unless ``approved``.
    5. Apply, wait until ready, verify health; record the rollback as a release.

    Args:
        environment: must equal ``runtime.environment``; names the release store.
        release_id: the release to return to (see the deploy reports or the plan's release table).
        approved: pre-approve (CI, staging); otherwise a human approves the plan in the UI.
        force: roll back across a database migration anyway (it must be backwards compatible).
        timeout_seconds: readiness timeout after the rollback.
        health_scope: ``full`` health check, or ``services`` (the app's endpoints only).
        approval_timeout_seconds: how long the approval form waits.

    Returns:
        The plan, the changes, and the health report.

    Raises:
        ParameterError / ReleaseNotFound: bad input, or nothing to roll back to; nothing changed.
        MigrationGuard: a migration was applied since the target release; nothing changed.
        ApprovalRejected: the approval was refused or timed out; nothing changed.
        CheckFailed: the services are not ready or not healthy after the rollback.
        LockBusy: another deploy or rollback of the environment runs (on any worker; it is named);
            nothing was changed.
    """
    settings = load_settings()
    logger = run_logger(__name__)
    _check_environment(settings, environment, timeout_seconds)
    approvals.check_preapproval(settings, approved)
    services = list(settings.runtime.services)
    runtime = get_runtime(settings)
    store = ReleaseStore.from_settings(settings, environment)
    steps: list[RollbackStep] = []
    records: list[ChangeRecord] = []
    after: list[ServiceStatus] = []
    report: HealthReport | None = None
    readiness: Readiness | None = None
    label = "?"
    crossed: list[str] = []
    approval_line = ""
    replicas_line = ""

    def publish(run: reports.RunOutcome) -> None:
        body = [
            f"# Rollback of {environment} on {runtime.kind} to {label}: **{run.outcome}**",
            "",
            *([f"**Why:** {run.failure}", ""] if run.failure else []),
            *([f"**Approval:** {approval_line}", ""] if approval_line else []),
            "## Plan",
            "",
            *([f"- {s.describe()}" for s in steps] or ["No plan was made."]),
            "",
            *([replicas_line, ""] if replicas_line else []),
            *rollout_sections(before=None, records=records, after=after, readiness=readiness),
            *health_lines(report),
        ]
        _publish_release_report(
            f"rollback-release-{environment}", f"Rollback of {environment}: {run.outcome}", store, body
        )

    # The lock is released before the report is published.
    with (
        reports.publishing(reports.RunOutcome(), publish, settings) as run,
        _release_lock(settings, environment, "rollback-release"),
    ):
        before = [s for s in list_services(runtime) if s.name in services]
        current = {s.name: s.image for s in before}
        target_images, target, label = _choose_target(store, runtime, current, services, release_id)
        revision = migration_revision(settings)
        if target is not None:
            crossed = releases.guard_migrations(store.all(), target, revision, force=force)
        steps = releases.plan_rollback(before, target_images, histories(runtime, list(target_images)))
        # A rollback changes images only: the counts scale-services set stay (shown, and checked after).
        replicas_line = "Replica counts are kept: " + (
            ", ".join(f"{s.name} {s.desired}" for s in before if s.name in target_images) or "none known"
        )
        reports.publish_markdown(
            f"rollback-release-{environment}-plan",
            "\n".join(
                [
                    f"# Rollback plan for {environment}: to {label}",
                    "",
                    *[f"- {s.describe()}" for s in steps],
                    "",
                    replicas_line,
                ]
            ),
            f"Rollback plan to {label}",
        )
        if not any(s.changes for s in steps):
            run.outcome = "nothing to do"
            return {"target": label, "plan": [s.describe() for s in steps], "changes": [], "health": None}
        plan = "\n".join(
            [
                f"# Rollback of {environment} to {label}",
                "",
                *[f"- {s.describe()}" for s in steps],
                "",
                replicas_line,
                *(["", f"**Crosses database migrations {crossed} (forced).**"] if crossed else []),
            ]
        )
        approval, _ = approvals.request_approval(
            settings,
            approved=approved,
            action=f"roll {environment} back to {label}",
            plan_markdown=plan,
            timeout_seconds=approval_timeout_seconds,
        )
        approval_line = approval.describe()
        records = apply_rollback(runtime, steps)
        try:
            readiness = wait_until_ready(
                runtime,
                settings,
                list(target_images),
                timeout_seconds,
                health_scope,
                list(settings.runtime.smoke_urls),
            )
        except ServicesNotReady as exc:
            after = exc.statuses
            raise CheckFailed(f"rolled back to {label}, but the services are not ready: {exc}") from exc
        after, report, failures = readiness.statuses, readiness.report, readiness.failures
        counts_before = {s.name: s.desired for s in before}
        moved = [
            f"{s.name} {counts_before[s.name]} -> {s.desired}"
            for s in after
            if s.name in counts_before and counts_before[s.name] != s.desired
        ]
        if moved:
            replicas_line = f"**Replica counts changed by the rollback:** {', '.join(moved)}"
        status: ReleaseStatus = "failed" if failures else "succeeded"
        store.record(
            kind="rollback",
            status=status,
            images={s.name: s.image for s in after if s.image},
            migration_revision=revision.revision,
            migration_note=revision.source,
            runtime=runtime.kind,
            flow_run_id=_flow_run_id(),
            previous_id=target.id if target else None,
            note=f"rollback to {label}" + (f"; forced across migrations {crossed}" if crossed else ""),
            replicas={s.name: s.desired for s in after},
        )
        if failures:
            raise CheckFailed(
                f"rolled back to {label}, but health is not back: {'; '.join(failures)}. Run diagnose."
            )
        run.outcome = "succeeded"
        logger.info("rolled back %s to %s", environment, label)
        return {
            "target": label,
            "plan": [s.describe() for s in steps],
            "changes": [r.__dict__ | {"commands": list(r.commands)} for r in records],
            "forced_across_migrations": crossed,
            "health": report.as_runbook() if report else None,
            "readiness": readiness.as_dict(),
            "approval": approval_line,
            "replicas": {s.name: s.desired for s in after},
        }
