"""The reports of the incident flows (outage triage, data recovery, security incident, FLUSHDB):
plain functions from what a run found and did to markdown, tested without Prefect."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tasks import backup, incidents, queues, releases, reports
from tasks.errors import CheckFailed
from tasks.health import HealthReport, Status
from tasks.incidents import (
    EvidenceBundle,
    EvidenceVerification,
    IsolationEnd,
    IsolationRecord,
    RollbackProposal,
    RotationPlan,
    RotationRecord,
    StepLog,
    ValidationResult,
)
from tasks.redisdb import FlushRecord, KeyCensus
from tasks.reports import RunOutcome
from tasks.runtime import ServiceStatus
from tasks.scaling import ReplicaCount
from tasks.settings import OpsSettings
from tasks.wal import point
from tasks.wal.recover import PointPlan, PointRestoreResult


def _failure_line(run: RunOutcome) -> list[str]:
    if run.failure is None:
        return []
    return ["", f"**Error:** {run.failure}"]


def _steps_table(steps: StepLog) -> str:
    return reports.markdown_table(
        ["step", "started", "took", "outcome", "detail"],
        [
            [s.name, f"{s.started_at:%H:%M:%S}", f"{s.duration_seconds:.2f} s", s.outcome, s.detail]
            for s in steps.steps
        ],
    )


def _services_table(statuses: list[ServiceStatus]) -> str:
    if not statuses:
        return "No services are managed by the runtime (runtime.kind none)."
    return reports.markdown_table(
        ["service", "image", "ready", "state", "restarts", "revision"],
        [[s.name, s.image, f"{s.ready}/{s.desired}", s.state, s.restarts, s.revision] for s in statuses],
    )


def _health_lines(report: HealthReport | None) -> list[str]:
    if report is None:
        return ["Health: not checked."]
    rows = [
        [name, check.status.value, check.error or "; ".join(check.warnings)]
        for name, check in report.checks.items()
    ]
    return [
        f"Health: **{report.status.value}**",
        "",
        reports.markdown_table(["check", "status", "finding"], rows),
    ]


def render_triage(
    stack: str,
    outcome: str,
    statuses: list[ServiceStatus],
    runtime_error: str | None,
    report: HealthReport | None,
    changes: list[incidents.RecentChange],
    migration: releases.MigrationRevision | None,
    window: timedelta,
    proposal: RollbackProposal | None,
    rollback: Any,
    approval: str = "",
) -> str:
    """The triage as markdown: services, checks, recent changes, the proposal and what became of it."""
    lines = [f"# Outage triage of {stack}: {outcome}", "", "## Services", ""]
    lines.append(
        _services_table(statuses) if runtime_error is None else f"Runtime unreachable: {runtime_error}"
    )
    lines += ["", "## Checks", "", *_health_lines(report), "", f"## Changes in the last {window}", ""]
    if changes:
        lines.append(
            reports.markdown_table(
                ["kind", "what", "at", "detail"], [list(c.as_row().values()) for c in changes]
            )
        )
    else:
        lines.append("No release, rollout revision or migration within the window.")
    if migration is not None:
        lines += ["", f"Database migration revision now: `{migration.revision or '-'}` ({migration.source})."]
    lines += ["", "## Rollback", ""]
    if proposal is None:
        lines.append(
            "No rollback proposed: "
            + (
                "the stack is healthy."
                if changes and report and report.status is Status.HEALTHY
                else "no recent release to roll back."
            )
        )
        lines.append("If the database is damaged, see recover-data (Data Loss / Corruption).")
    else:
        lines += ["Proposed:", "", proposal.describe()]
        if approval:
            lines += ["", f"Approval: {approval}"]
        if isinstance(rollback, dict):
            health = (rollback.get("health") or {}).get("status", "not checked")
            lines += ["", f"rollback-release: back to {rollback.get('target')}; health {health}."]
    return "\n".join(lines)


def _backup_rows(listing: list[backup.BackupManifest], chosen: str | None) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    rows = []
    for m in listing:
        last = max(m.verifications, key=lambda v: v.at) if m.verifications else None
        rows.append(
            {
                "id": m.id,
                "database": m.database,
                "finished_at": m.finished_at.isoformat(timespec="seconds"),
                "age_h": round((now - m.finished_at).total_seconds() / 3600, 1),
                "size_bytes": m.size_bytes,
                "rows": m.total_rows,
                "verified": m.strongest_verified or "never",
                "last_check": ""
                if last is None
                else f"{last.level} {'ok' if last.ok else 'FAILED'} {last.at:%m-%d %H:%M}",
                "chosen": "<-" if m.id == chosen else "",
            }
        )
    return rows


def render_recovery(
    stack: str,
    outcome: str,
    steps: StepLog,
    preflight: backup.RestorePreflight | None,
    listing: list[backup.BackupManifest],
    recorded: list[ReplicaCount],
    validations: list[ValidationResult],
    report: HealthReport | None,
    restore: backup.RestoreResult | None,
    queries: Sequence[str] = (),
    queries_source: str = "incidents.validation_queries",
    approval: str = "",
    *,
    point_plan: PointPlan | None = None,
    point_done: PointRestoreResult | None = None,
) -> str:
    """The recovery as markdown: plan, every step with its timing, evidence, validation, health.

    A recovery to a point in time gives ``point_plan`` (and, once done, ``point_done``) instead of a
    backup's ``preflight`` and ``restore``.
    """
    lines = [f"# Data recovery of {stack}: {outcome}", "", "## Steps", "", _steps_table(steps)]
    if approval:
        lines += ["", f"Approval: {approval}"]
    if preflight is not None or point_plan is not None:
        lines += ["", "## Plan", ""]
        if recorded:
            lines.append(
                "Stop writes: scale "
                + ", ".join(f"{r.service} {r.replicas} -> 0" for r in recorded)
                + "; scale back to these counts afterwards (also on failure)."
            )
        else:
            lines.append("Writes are not stopped by this run (stop_writes=false or no runtime).")
        if point_plan is not None:
            lines += ["", point.render_point_plan(point_plan)]
        elif preflight is not None:
            lines += ["", *[f"{i}. {s}" for i, s in enumerate(preflight.steps(), 1)]]
        if queries:
            lines += [
                "",
                f"Validation queries after the restore (from {queries_source}):",
                "",
                *[f"- `{q}`" for q in queries],
            ]
        else:
            lines += [
                "",
                "No validation query after the restore: pass validation_queries or set"
                " incidents.validation_queries.",
            ]
    if listing:
        rows = _backup_rows(listing, preflight.backup_id if preflight else None)
        lines += [
            "",
            "## Candidate backups",
            "",
            reports.markdown_table(list(rows[0]), [list(r.values()) for r in rows]),
        ]
    if restore is not None:
        lines += [
            "",
            "## Restore",
            "",
            f"- evidence: {restore.comparison.summary()}",
            f"- old database: {restore.old_database or '-'} ({'kept' if restore.old_kept else 'dropped'})",
            "",
            *restore.kept_lines(),
        ]
    if point_done is not None:
        lines += ["", "## Restore to a point", "", *point.render_point_done(point_done)]
    if validations:
        lines += [
            "",
            "## Validation queries",
            "",
            reports.markdown_table(
                ["query", "ok", "value", "error", "ms"],
                [[v.query, "ok" if v.ok else "FAILED", v.value, v.error, v.duration_ms] for v in validations],
            ),
        ]
    if report is not None:
        lines += ["", "## After", "", *_health_lines(report)]
    return "\n".join(lines)


def _validation_next_steps(
    error: CheckFailed,
    settings: OpsSettings,
    manifest: backup.BackupManifest,
    restore: backup.RestoreResult | None,
    report: HealthReport,
    candidates: list[str],
) -> str:
    """The message of a failed validation: what failed, where the app writes now, what to do next."""
    health = report.status.value + (
        " (" + "; ".join(f"{n}: {report.checks[n].error or 'failing'}" for n in report.failed_checks) + ")"
        if report.failed_checks
        else ""
    )
    others = [c for c in candidates if c != manifest.id][:5]
    kept = restore.old_database if restore else None
    undo = (
        f" To undo, put the replaced database back: run restore-database with swap_back={kept}"
        f" target_database={restore.target_database} (same approval, proven by counts and hashes)."
        if kept and restore
        else ""
    )
    return (
        f"{error}. The restore of backup {manifest.id} stands and the application already runs on, and"
        f" writes to, the restored data; the services were scaled back."
        + (
            f" The replaced database is kept as {kept} (read-only; {restore.kept_open_command})."
            if kept and restore
            else ""
        )
        + undo
        + " Or run recover-data again with another backup_id"
        + (f" (candidates: {', '.join(others)})" if others else "")
        + f". Health after: {health}"
    )


def render_security(
    stack: str,
    outcome: str,
    steps: StepLog,
    bundle: EvidenceBundle | None,
    verification: EvidenceVerification | None,
    plan: RotationPlan | None,
    record: RotationRecord | None,
    report: HealthReport | None,
    approval: str = "",
    *,
    isolation: IsolationRecord | None = None,
    isolate: bool = False,
    patch: PatchStep | None = None,
) -> str:
    """The incident response as markdown; secrets appear only as names and fingerprints."""
    lines = [f"# Security incident on {stack}: {outcome}", "", "## Steps", "", _steps_table(steps)]
    if approval:
        lines += ["", f"Approval: {approval}"]
    if bundle is not None:
        lines += [
            "",
            "## Evidence",
            "",
            f"- bundle: `{bundle.prefix}` in {bundle.location}",
            f"- files: {len(bundle.manifest.files)}, {bundle.total_bytes} bytes",
            f"- manifest sha256: `{bundle.manifest_sha256}` (keep this line: it proves the manifest later)",
            f"- verified: {verification.summary() if verification else 'not yet'}",
        ]
        if bundle.manifest.errors:
            lines += ["", "Evidence that could not be collected:"]
            lines += [f"- {name}: {text}" for name, text in sorted(bundle.manifest.errors.items())]
        lines += [
            "",
            reports.markdown_table(
                ["file", "bytes", "sha256"], [[f.path, f.size, f.sha256] for f in bundle.manifest.files]
            ),
        ]
    lines += ["", "## Isolation: block external traffic", ""]
    if isolation is not None:
        lines += isolation_lines(isolation)
    elif isolate:
        lines.append("Not planned yet (the evidence comes first).")
    else:
        lines.append(
            "Not requested: isolate=true blocks external traffic (a NetworkPolicy on Kubernetes, the public"
            " entry stopped on Compose) after the evidence is taken; end-isolation puts it back."
        )
    if plan is not None:
        lines += ["", "## Secret rotation", ""]
        if plan.empty:
            lines.append(
                "Nothing is configured to rotate: set incidents.rotate_roles / incidents.app_secrets."
            )
        if plan.problems:
            lines += ["Problems (rotation refused until fixed):", *[f"- {p}" for p in plan.problems], ""]
        shown = record.secrets if record is not None else ()
        if shown:
            lines.append(
                reports.markdown_table(
                    ["kind", "name", "location", "old fingerprint", "new fingerprint", "outcome"],
                    [
                        [
                            s.kind,
                            s.name,
                            s.location,
                            s.old_fingerprint or "-",
                            s.new_fingerprint or "-",
                            s.outcome,
                        ]
                        for s in shown
                    ],
                )
            )
        elif not plan.empty:
            lines += [f"- {t.describe()}" for t in plan.targets]
        if record is not None and record.dry_run and not plan.empty:
            lines += [
                "",
                "Dry run: nothing was rotated. Run with dry_run=false to rotate (after an approval).",
            ]
        if record is not None and record.commands:
            lines += ["", "Commands:", *[f"- `{c}`" for c in record.commands]]
    if report is not None:
        lines += ["", "## After", "", *_health_lines(report)]
    lines += ["", "## Security patches and redeploy", ""]
    if patch is not None:
        lines += patch.lines()
    else:
        lines.append(
            "Not requested: patch_and_redeploy=true runs update-dependencies (scope security) after the"
            " rotation, which deploys the patched image to staging."
        )
    lines += ["", "Also, by hand: review and harden the configuration."]
    return "\n".join(lines)


@dataclass(frozen=True)
class LinkedRun:
    """A flow run this one started (a subflow), linked from its report."""

    flow: str
    name: str
    id: str
    state: str
    url: str

    def markdown(self) -> str:
        return f"[{self.flow} run {self.name}]({self.url}): {self.state}"


@dataclass
class PatchStep:
    """Security incident step 4: update-dependencies (scope security) and the staging deploy it makes."""

    deploy_to_staging: bool
    planned_only: bool = False
    runs: list[LinkedRun] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def lines(self) -> list[str]:
        """The step for the report: what runs (or would), with links to the runs and their outcome."""
        then = (
            "then deploy-release to staging with the built image (rolled back there on failure)"
            if self.deploy_to_staging
            else "building the image only: these settings do not point at staging (runtime.environment"
            " staging), so deploy it there with deploy-release/staging, then promote it"
        )
        head = f"update-dependencies with scope `security` (only what fixes advisories), {then}."
        if self.planned_only:
            return [f"Planned (runs after the approval and the rotation): {head}"]
        lines = [f"Ran: {head}", ""]
        lines += [f"- {run.markdown()}" for run in self.runs] or ["- no run was started"]
        if self.summary:
            fixed = self.summary.get("advisories_fixed") or {}
            lines += [
                "",
                f"- outcome: {self.summary.get('outcome')}",
                f"- image: `{self.summary.get('image') or '-'}`",
                f"- staging: {self.summary.get('staging') or '-'}",
                "- advisories fixed: " + (", ".join(f"{k} {v}" for k, v in fixed.items() if v) or "none"),
                f"- advisories remaining: {self.summary.get('advisories_remaining')}",
            ]
        if self.error:
            lines += ["", f"**Failed:** {self.error}"]
        return lines


def isolation_lines(isolation: IsolationRecord) -> list[str]:
    """An isolation for a report: the plan (or the changes), what stays, the undo, the record."""
    plan = isolation.plan
    scope = (
        ", ".join(plan.services) if plan.services else "the runtime's default (every pod / the public entry)"
    )
    lines = [f"Runtime {plan.runtime}; services: {scope}.", ""]
    if isolation.already_in_force:
        lines += [f"Already in force: {isolation.describe()}; nothing changed.", ""]
    elif isolation.dry_run:
        lines += ["Dry run: nothing was changed. Would:", ""]
    else:
        lines += [f"Done: {isolation.describe()}.", ""]
    lines += [f"- {a}" for a in plan.actions] or ["- nothing to change"]
    if plan.notes:
        lines += ["", *[f"- {n}" for n in plan.notes]]
    if isolation.changes:
        lines += [
            "",
            reports.markdown_table(
                ["target", "changed", "before", "after"],
                [[c.target, c.changed, _pairs(c.before), _pairs(c.after)] for c in isolation.changes],
            ),
        ]
    lines += ["", "end-isolation puts back:", "", *[f"- {u}" for u in plan.undo]] if plan.undo else []
    if isolation.evidence:
        lines += ["", f"Evidence taken before: `{isolation.evidence}`."]
    return lines


def _pairs(values: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in values.items())


def render_end_isolation(
    stack: str,
    outcome: str,
    end: IsolationEnd | None,
    report: HealthReport | None,
    approval: str = "",
    recorded_at: str = "",
) -> str:
    """End of an isolation as markdown: the record (who, when, what), what was put back, health after."""
    lines = [f"# End of isolation of {stack}: {outcome}", ""]
    if end is None:
        lines.append(f"No isolation record read{f' ({recorded_at})' if recorded_at else ''}.")
        return "\n".join(lines)
    record = end.record
    lines += [
        f"- record: `{recorded_at}`" if recorded_at else "- record: -",
        f"- {record.describe()}",
        f"- evidence taken before: `{record.evidence or '-'}`",
        "",
        "## The isolation",
        "",
        *[f"- {a}" for a in record.plan.actions],
        "",
        "## Put back" if not end.dry_run else "## Would put back (dry run: nothing was changed)",
        "",
        *([f"- {u}" for u in record.plan.undo] or ["- nothing was changed by the isolation"]),
    ]
    if approval:
        lines += ["", f"Approval: {approval}"]
    if end.changes:
        lines += [
            "",
            reports.markdown_table(
                ["target", "changed", "before", "after", "commands"],
                [
                    [c.target, c.changed, _pairs(c.before), _pairs(c.after), "; ".join(c.commands)]
                    for c in end.changes
                ],
            ),
        ]
    if end.archived is not None:
        lines += ["", f"Record moved to `{end.archived}`."]
    elif end.dry_run:
        lines += ["", "Run with dry_run=false (after an approval) to put it back."]
    if report is not None:
        lines += ["", "## After", "", *_health_lines(report)]
    return "\n".join(lines)


def render_census(census: KeyCensus, shown: int = 50) -> str:
    """What the db holds: memory, keys by prefix, BullMQ jobs by queue and state."""
    ratio = f" ({census.used_memory / census.maxmemory:.0%} of maxmemory)" if census.maxmemory else ""
    lines = [
        f"Redis {census.server}, db {census.db}: **{census.dbsize} keys**, used memory"
        f" {census.used_memory_human}{ratio}, maxmemory-policy `{census.maxmemory_policy}`.",
        "",
    ]
    if not census.complete:
        lines.append(f"Only the first {census.scanned} keys were counted (incidents.key_census_max_keys).")
    groups = list(census.groups[:shown])
    lines.append(reports.markdown_table(["key prefix", "keys"], groups or [["(empty)", 0]]))
    if len(census.groups) > shown:
        lines.append(f"... and {len(census.groups) - shown} more prefixes (see the table artifact).")
    lines += ["", "BullMQ jobs that would be lost:", ""]
    if census.queue_error:
        lines.append(f"Queue counts unavailable: {census.queue_error}")
    else:
        states = queues.JOB_STATES
        lines.append(
            reports.markdown_table(
                ["queue", *states], [[q.name, *[q[s] for s in states]] for q in census.queues]
            )
        )
    return "\n".join(lines)


def render_flush(
    stack: str, outcome: str, census: KeyCensus | None, record: FlushRecord | None, approval: str = ""
) -> str:
    lines = [f"# Redis FLUSHDB on {stack}: {outcome}", ""]
    if approval:
        lines += [f"Approval: {approval}", ""]
    if record is not None:
        if record.dry_run:
            lines.append(
                f"Dry run: nothing was deleted. `{record.command}` would delete {record.keys_before} keys."
                " The gentler way is clean-jobs (old completed/failed jobs). Run with dry_run=false to"
                " flush after an approval."
            )
        else:
            lines.append(f"`{record.command}`: {record.keys_before} keys before, {record.keys_after} after.")
        lines.append("")
    if census is not None:
        lines += [
            "## What the db holds" + (" (before the flush)" if record and not record.dry_run else ""),
            "",
        ]
        lines.append(render_census(census))
    return "\n".join(lines)
