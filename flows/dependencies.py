"""Runbook: "Updating Dependencies".

``npm audit`` -> update (by scope) in a working copy -> ``npm test`` -> build the image -> deploy to
staging first (through ``deploy-release``, which rolls back on failure) -> audit again and report. The
live checkout is only read; the update ends as a commit on a branch of the working copy, ready to be
promoted once staging has proven it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from tasks import reports
from tasks.dependencies import (
    SCOPES,
    SEVERITIES,
    Advisory,
    AdvisoryDelta,
    AuditReport,
    BuildResult,
    CommitRecord,
    OutdatedPackage,
    TestRun,
    TestsFailed,
    UpdatePlan,
    UpdateResult,
    WorkingCopy,
    WorkingCopyPrune,
    apply_updates_task,
    audit_task,
    build_image_task,
    check_source,
    check_staging_image_task,
    claim_run_directory,
    commit_update_task,
    compare_audits,
    create_working_copy_task,
    ensure_tools,
    install_task,
    npm_environment,
    outdated_task,
    plan_for_scope_task,
    prune_working_copies_task,
    run_directory_name,
    run_tests_task,
    tag_for_lockfile,
)
from tasks.errors import OpsError, ParameterError
from tasks.runlog import run_logger
from tasks.settings import OpsSettings, load_settings

_OUTPUT_TAIL = 4000
STAGING = "staging"


class StagingDeployFailed(OpsError):
    """deploy-release failed on staging with the new image; ``staging_restored`` says if staging is back."""

    def __init__(self, message: str, *, staging_restored: bool) -> None:
        super().__init__(message)
        self.staging_restored = staging_restored


@dataclass
class DependencyRun:
    """Everything one run learned, for the report (filled in step by step, published also on failure)."""

    stack: str
    scope: str
    source: Path
    deploy_to_staging: bool
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    working_copy: WorkingCopy | None = None
    audit_before: AuditReport | None = None
    outdated: list[OutdatedPackage] = field(default_factory=list)
    plan: UpdatePlan | None = None
    update: UpdateResult | None = None
    audit_after: AuditReport | None = None
    tests: TestRun | None = None
    commit: CommitRecord | None = None
    build: BuildResult | None = None
    staging: str | None = None
    pruned: WorkingCopyPrune | None = None
    outcome: str = "running"
    failure: str | None = None

    @property
    def delta(self) -> AdvisoryDelta | None:
        if self.audit_before is None or self.audit_after is None:
            return None
        return compare_audits(self.audit_before, self.audit_after)

    def summary(self) -> dict[str, Any]:
        delta = self.delta
        return {
            "scope": self.scope,
            "outcome": self.outcome,
            "source": str(self.source),
            "working_copy": str(self.working_copy.path) if self.working_copy else None,
            # The branch exists only when the update was committed on it.
            "branch": self.commit.branch if self.commit and self.commit.changed else None,
            "commit": self.commit.commit if self.commit and self.commit.changed else None,
            "image": self.build.ref if self.build else None,
            "staging": self.staging,
            "changes": [
                {"package": c.name, "path": c.path, "from": c.before, "to": c.after}
                for c in (self.update.changes if self.update else ())
            ],
            "advisories_fixed": delta.fixed_by_severity() if delta else {},
            "fixed_advisories": [
                {"id": a.id, "package": a.package, "severity": a.severity, "title": a.title, "url": a.url}
                for a in (delta.fixed if delta else ())
            ],
            "advisories_remaining": len(self.audit_after.advisories) if self.audit_after else None,
            "working_copies_removed": [str(p) for p in self.pruned.removed] if self.pruned else [],
        }


def _advisory_ids(delta: AdvisoryDelta | None, package: str) -> str:
    """``1099001 (high) Prototype pollution in x: https://...`` for each advisory fixed in ``package``."""
    if delta is None:
        return ""
    return ", ".join(
        f"{a.id} ({a.severity})" + (f" {a.title}" if a.title else "") + (f": {a.url}" if a.url else "")
        for a in delta.fixed
        if a.package == package
    )


def _advisory_link(advisory: Advisory) -> str:
    """The advisory as a markdown link to its page (its number when the audit gave no title)."""
    title = f"{advisory.title} ({advisory.id})" if advisory.title else advisory.id
    return f"[{title}]({advisory.url})" if advisory.url else title


def change_rows(run: DependencyRun) -> list[dict[str, Any]]:
    """One row per top-level package the update moved (nested installs are in the lockfile diff)."""
    if run.update is None:
        return []
    delta = run.delta
    return [
        {
            "package": change.name,
            "from": change.before or "(new)",
            "to": change.after or "(removed)",
            "advisories fixed": _advisory_ids(delta, change.name),
        }
        for change in run.update.changes
        if change.path.count("node_modules/") == 1
    ]


def lockfile_markdown(run: DependencyRun) -> str:
    """The whole lockfile diff: every install path, from -> to."""
    if run.update is None:
        return "No update was applied."
    rows = [[c.path, c.kind, c.before or "", c.after or ""] for c in run.update.changes]
    return "\n".join(
        [
            f"# Lockfile diff ({run.scope})",
            "",
            f"`{run.working_copy.lockfile if run.working_copy else 'package-lock.json'}` sha256 "
            f"{run.update.lockfile_sha_before[:12]} -> {run.update.lockfile_sha_after[:12]}",
            "",
            reports.markdown_table(["path", "change", "from", "to"], rows) if rows else "No change.",
        ]
    )


def _prune_line(pruned: WorkingCopyPrune) -> str:
    """Retention of the run directories, in one line of the report."""
    text = f"old working copies: keeping the newest {pruned.keep} in `{pruned.work_dir}`"
    if pruned.removed:
        text += f"; removed {', '.join(f'`{p.name}`' for p in pruned.removed)}"
    if pruned.in_use:
        text += f"; in use by another run, kept: {', '.join(f'`{p.name}`' for p in pruned.in_use)}"
    if pruned.failed:
        text += "; **could not remove** " + ", ".join(f"`{p.name}` ({why})" for p, why in pruned.failed)
    return text


def render_markdown(run: DependencyRun) -> str:
    """The run as markdown: outcome, changes, advisories fixed and remaining, tests, build, staging."""
    wc = run.working_copy
    lines = [
        f"# Dependency update of {run.stack} ({run.scope}): **{run.outcome}**",
        "",
        f"- source (read only): `{run.source}`"
        + (f" at commit `{wc.source_commit[:12]}`" if wc and wc.source_commit else ""),
    ]
    if wc is not None:
        lines.append(f"- working copy: `{wc.path}`")
    if run.commit is not None and run.commit.changed:
        lines.append(
            f"- change committed: `{run.commit.commit[:12]}` on `{run.commit.branch}`; to promote it, in the "
            f"checkout: `git fetch {run.commit.repository} {run.commit.branch}`"
        )
    if run.build is not None:
        lines.append(f"- image: `{run.build.ref}` ({run.build.image_id[:19]})")
    if run.staging is not None:
        lines.append(f"- staging: {run.staging}")
    if run.pruned is not None:
        lines.append(f"- {_prune_line(run.pruned)}")
    if run.failure:
        lines += ["", "## What failed", "", run.failure]
    rows = change_rows(run)
    lines += ["", "## Packages", ""]
    lines.append(
        reports.markdown_table(
            ["package", "from", "to", "advisories fixed"], [list(r.values()) for r in rows]
        )
        if rows
        else "No package changed."
    )
    if run.plan is not None and run.plan.unfixable:
        lines += ["", "No published fix for:", "", *(f"- {item}" for item in run.plan.unfixable)]
    delta = run.delta
    if run.audit_before is not None:
        before = run.audit_before.by_severity()
        fixed = delta.fixed_by_severity() if delta else dict.fromkeys(before, 0)
        after = run.audit_after.by_severity() if run.audit_after else {}
        lines += ["", "## Advisories by severity", ""]
        lines.append(
            reports.markdown_table(
                ["severity", "before", "fixed", "after"],
                [[s, before[s], fixed[s], after.get(s, "")] for s in SEVERITIES],
            )
        )
    if delta is not None and delta.fixed:
        lines += ["", "## Advisories fixed", ""]
        lines.append(
            reports.markdown_table(
                ["package", "severity", "advisory"],
                [[a.package, a.severity, _advisory_link(a)] for a in delta.fixed],
            )
        )
    if run.audit_after is not None and run.audit_after.advisories:
        lines += ["", "## Advisories remaining", ""]
        lines.append(
            reports.markdown_table(
                ["package", "severity", "advisory", "vulnerable"],
                [
                    [a.package, a.severity, _advisory_link(a), a.vulnerable_range]
                    for a in run.audit_after.advisories
                ],
            )
        )
    if run.outdated:
        lines += ["", "## Outdated before the update", ""]
        lines.append(
            reports.markdown_table(
                ["package", "current", "wanted (in range)", "latest"],
                [[o.name, o.current or "missing", o.wanted, o.latest] for o in run.outdated],
            )
        )
    if run.tests is not None:
        status = "passed" if run.tests.passed else f"**failed** (exit {run.tests.returncode})"
        lines += ["", "## Tests", "", f"`{run.tests.command}` {status} in {run.tests.duration_seconds:.1f}s"]
        if not run.tests.passed:
            lines += ["", "```", run.tests.output[-_OUTPUT_TAIL:], "```"]
    if run.update is not None and run.update.commands:
        lines += ["", "## Commands", "", *(f"- `{c}`" for c in run.update.commands)]
    return "\n".join(lines)


@task(name="publish-dependency-report", cache_policy=NO_CACHE)
def publish_report(run: DependencyRun) -> None:
    """Markdown report, a table of package changes and the lockfile diff, with stable keys."""
    key = f"dependencies-{run.stack}"
    reports.publish_markdown(key, render_markdown(run), f"Dependency update ({run.scope}): {run.outcome}")
    reports.publish_table(f"{key}-changes", change_rows(run), "Packages moved by the update")
    reports.publish_markdown(f"{key}-lockfile", lockfile_markdown(run), "Lockfile diff of the update")


def deploy_staging(settings: OpsSettings, tag: str) -> str:
    """Deploy ``tag`` to staging through the ``deploy-release`` flow (as a subflow).

    On failure, the release store tells what deploy-release did: rolled staging back to the release
    that ran before (health back), failed to restore it, or stopped before changing anything.

    Raises:
        StagingDeployFailed: deploy-release ended Failed; the message says where staging is now.
    """
    from flows.releases import deploy_release
    from tasks.releases import ReleaseStore

    state = deploy_release(environment=STAGING, image_tag=tag, return_state=True)
    if state.is_completed():
        result = state.result()
        return (
            f"release {result['release']['id']} runs {tag}; the previous release was "
            f"{result['previous_release']}"
        )
    why = state.message or state.name
    run_id = str(state.state_details.flow_run_id)
    deploys = [
        r
        for r in ReleaseStore.from_settings(settings, STAGING).all()
        if r.flow_run_id == run_id and r.kind == "deploy"
    ]
    if not deploys:
        raise StagingDeployFailed(
            f"deploy-release stopped before changing staging, which still runs the previous release: {why}",
            staging_restored=True,
        )
    record = deploys[-1]
    if record.status == "not-switched":
        raise StagingDeployFailed(
            f"staging deploy of image tag {tag} (release {record.id}) failed before any service was"
            f" switched; staging still runs {record.previous_id}. deploy-release: {why}",
            staging_restored=True,
        )
    if record.status == "rolled-back":
        raise StagingDeployFailed(
            f"staging deploy of image tag {tag} (release {record.id}) failed and deploy-release rolled "
            f"staging back to the previous release {record.previous_id}, healthy again. The update stays on "
            f"its branch; fix it and run update-dependencies again. deploy-release: {why}",
            staging_restored=True,
        )
    raise StagingDeployFailed(
        f"staging deploy of image tag {tag} (release {record.id}) failed and the rollback to "
        f"{record.previous_id} did not restore health; run the diagnose flow now. deploy-release: {why}",
        staging_restored=False,
    )


@flow(name="update-dependencies", log_prints=True)
def update_dependencies(
    scope: Literal["security", "minor", "latest"] = "security",
    deploy_to_staging: bool = True,
    build: bool = True,
    source_dir: str | None = None,
) -> dict[str, Any]:
    """Runbook "Updating Dependencies": audit, update, test, build, deploy to staging, report.

    1. A working copy of the application's checkout (``dependencies.source_dir``; never modified),
       installed with ``npm ci``; ``npm audit`` and ``npm outdated`` before.
    2. Update by scope: ``security`` (only what fixes advisories), ``minor`` (``npm update``, within
       ranges) or ``latest``; the lockfile diff is captured.
    3. The app's tests (``dependencies.test_argv``); a failure stops here, its output in the report.
    4. The change is committed on a new branch (none when nothing changed); the image is built,
       tagged ``deps-<lockfile sha>``.
    5. Staging through ``deploy-release``; a failed deploy is rolled back by it and this run fails.
    6. Audit after; the report (markdown, package table, lockfile diff) is published also on failure.

    Args:
        scope: ``security``, ``minor`` or ``latest``.
        deploy_to_staging: deploy the built image to staging (needs ``build``).
        build: build the image; off, the run ends with the tested commit on its branch.
        source_dir: the checkout to update, instead of ``dependencies.source_dir``.

    Returns:
        A summary: outcome, branch, commit, image, package changes, advisories fixed and remaining.

    Raises:
        ParameterError: bad scope or source, or deploy_to_staging with settings that do not point
            at staging; before any side effect.
        SettingsError: deploy_to_staging, but staging's services do not run ``dependencies.image_name``
            (checked before anything is built).
        TestsFailed: the tests failed on the update (nothing built or deployed).
        StagingDeployFailed: the staging deploy failed and was rolled back.
    """
    settings = load_settings()
    logger = run_logger(__name__)
    if scope not in SCOPES:
        raise ParameterError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if deploy_to_staging and not build:
        raise ParameterError("deploy_to_staging needs build=true (staging runs the built image)")
    if deploy_to_staging and (settings.runtime.kind == "none" or settings.runtime.environment != STAGING):
        raise ParameterError(
            "deploy_to_staging needs settings that point at staging (runtime.kind compose or kubernetes, "
            f"runtime.environment 'staging'; now {settings.runtime.kind!r}, "
            f"{settings.runtime.environment!r}); pass deploy_to_staging=false to stop after the build"
        )
    source = Path(source_dir) if source_dir else settings.dependencies.source_dir
    ensure_tools()
    check_source(source)
    if deploy_to_staging:
        # Read-only: a build under another repository name than staging runs would deploy a tag
        # that repository does not have.
        check_staging_image_task(settings)

    run = DependencyRun(settings.stack, scope, source.resolve(), deploy_to_staging)
    with reports.publishing(run, publish_report, settings, running=("running",)):
        _update(settings, run, build=build)
    logger.info("dependency update (%s): %s", scope, run.outcome)
    return run.summary()


def _update(settings: OpsSettings, run: DependencyRun, *, build: bool) -> None:
    """The run in its own run directory (held as in use while it lasts); then older run directories
    beyond ``dependencies.keep_working_copies`` are removed, whatever the outcome."""
    deps = settings.dependencies
    work_dir = deps.work_dir.resolve()
    # Two runs in the same second must not share a working copy.
    name = run_directory_name(run.started, run.scope, uuid.uuid4().hex[:6])
    with claim_run_directory(work_dir, name, flow_run_id=_flow_run_id()) as run_dir:
        try:
            _steps(settings, run, run_dir, build=build)
        finally:
            run.pruned = prune_working_copies_task(work_dir, deps.keep_working_copies, confirm=True)


def _flow_run_id() -> str | None:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


def _steps(settings: OpsSettings, run: DependencyRun, run_dir: Path, *, build: bool) -> None:
    """The steps of the flow, in runbook order; ``run`` records each result as it comes."""
    deps = settings.dependencies
    stamp = run.started.strftime("%Y%m%dT%H%M%SZ")
    env = npm_environment(deps, run_dir)

    branch = f"{deps.branch_prefix}{run.scope}-{stamp}"
    wc = create_working_copy_task(env, run.source, run_dir / "src", branch)
    run.working_copy = wc
    install_task(env, wc)
    run.audit_before = audit_task(env, wc.path)
    run.outdated = outdated_task(env, wc.path)

    run.plan = plan_for_scope_task(env, wc, run.scope, run.audit_before, run.outdated)
    run.update = apply_updates_task(env, wc, run.plan)
    run.audit_after = audit_task(env, wc.path)
    if not run.update.changed:
        run.outcome = "nothing to update"
        return

    run.tests = run_tests_task(env, wc)
    if not run.tests.passed:
        run.outcome = "tests failed"
        raise TestsFailed(
            f"`{run.tests.command}` failed (exit {run.tests.returncode}) on the {run.scope} update; nothing "
            f"was built or deployed. The updated tree is in {wc.path} for inspection; the output is in the "
            "report."
        )

    changed = ", ".join(f"{c.name} {c.before}->{c.after}" for c in run.update.changes[:10])
    run.commit = commit_update_task(env, wc, f"Update dependencies ({run.scope})\n\n{changed}\n")
    if not build:
        run.outcome = "tested and committed"
        return

    tag = tag_for_lockfile(wc.lockfile_path)
    run.build = build_image_task(settings, wc.path, tag)
    if not run.deploy_to_staging:
        run.outcome = "built"
        return
    try:
        run.staging = deploy_staging(settings, tag)
    except StagingDeployFailed as exc:
        run.outcome = "staging deploy failed, " + (
            "staging back on the previous release" if exc.staging_restored else "STAGING NOT RESTORED"
        )
        run.staging = str(exc)
        raise
    run.outcome = "deployed to staging"


if __name__ == "__main__":
    import json

    print(json.dumps(update_dependencies(deploy_to_staging=False, build=False), indent=2))
