"""Runbook: "Common Issues" 1-6 and "Performance Troubleshooting".

Every diagnostic the runbook runs by hand, gathered in one read-only run: PostgreSQL connections,
long-running queries and top statements; Redis memory and eviction policy; BullMQ queues, stalled
and failed jobs; services' status, restarts, logs and resource usage; disk space and the uploads
directory; TCP reachability and DNS, from the ops host and from inside the backend, side by side;
where point-in-time recovery is in use, the WAL archive (RPO, slot, restorable window). Each finding
names the runbook's resolution and the flow that performs it. Started by hand, or by an automation
on the health check's ``unhealthy`` event.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import diagnose as diagnostics  # the flow below is named diagnose
from tasks import reports
from tasks.diagnose import DiagnoseReport, Diagnosis, QueuesEvidence, ServicesEvidence, Severity
from tasks.errors import CheckFailed, ParameterError
from tasks.runlog import run_logger
from tasks.settings import load_settings

_ICON = {Severity.OK: "ok", Severity.INFO: "info", Severity.WARNING: "WARNING", Severity.CRITICAL: "CRITICAL"}


def _evidence_section(diagnosis: Diagnosis) -> list[str]:
    lines = [
        "",
        f"### {diagnosis.title} — {_ICON[diagnosis.severity]} ({diagnosis.duration_ms:g} ms)",
        "",
    ]
    if diagnosis.error and diagnosis.evidence is None:
        lines += [f"Evidence could not be gathered: {diagnosis.error}"]
        return lines
    rows = diagnosis.rows()
    if rows:
        lines.append(reports.markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    else:
        lines.append("_nothing to show_")
    evidence = diagnosis.evidence
    if isinstance(evidence, QueuesEvidence):
        if evidence.stalled:
            stalled = evidence.stalled_rows()
            lines += ["", "Stalled active jobs (lock expired):", ""]
            lines.append(reports.markdown_table(list(stalled[0]), [list(r.values()) for r in stalled]))
        if evidence.failed:
            failed = evidence.failed_rows()
            lines += ["", "Newest failed jobs:", ""]
            lines.append(reports.markdown_table(list(failed[0]), [list(r.values()) for r in failed]))
    if isinstance(evidence, ServicesEvidence):
        for tail in evidence.logs:
            if tail.error:
                lines += ["", f"Logs of {tail.service} could not be read: {tail.error}"]
            elif tail.matches:
                excerpt = [line.replace("```", "'''") for line in tail.matches[-10:]]
                lines += [
                    "",
                    f"Matching lines in the last {tail.lines} log lines of {tail.service}:",
                    "",
                    "```",
                ]
                lines += [*excerpt, "```"]
    return lines


def render_markdown(report: DiagnoseReport) -> str:
    """The report as markdown: overall severity, findings with resolutions, then the evidence."""
    lines = [
        f"# Diagnosis of {report.stack}: **{report.severity.value}**",
        "",
        f"Started at {report.started_at.isoformat(timespec='seconds')}"
        + (f", triggered by {report.triggered_by}" if report.triggered_by else "")
        + ". Read-only: nothing was changed.",
    ]
    lines += [f"- {note}" for note in report.notes]
    findings = report.findings(Severity.INFO)
    lines += ["", "## Findings", ""]
    if findings:
        lines.append(
            reports.markdown_table(
                ["severity", "check", "finding", "runbook", "resolution", "flow"],
                [
                    [
                        _ICON[f.severity],
                        f.check,
                        f.summary,
                        f.runbook,
                        f.resolution or "",
                        f"`{f.flow}`" if f.flow else "by hand",
                    ]
                    for f in findings
                ],
            )
        )
    else:
        lines.append("Nothing found: every check is ok.")
    lines += ["", "## Evidence"]
    for diagnosis in report.diagnoses:
        lines += _evidence_section(diagnosis)
    return "\n".join(lines)


@task(name="publish-diagnosis", cache_policy=NO_CACHE)
def publish_report(report: DiagnoseReport) -> None:
    """Markdown (everything) and a findings table, with stable keys per stack."""
    reports.publish_markdown(
        f"diagnose-{report.stack}",
        render_markdown(report),
        f"Diagnosis of {report.stack}: {report.severity.value}",
    )
    reports.publish_table(
        f"diagnose-{report.stack}-findings",
        [f.as_row() for f in report.findings(Severity.OK)],
        "Diagnose findings, worst first, with the runbook's resolution and its flow",
    )


@flow(name="diagnose", log_prints=True)
def diagnose(
    long_query_seconds: float | None = None,
    triggered_by: str | None = None,
    fail_on_critical: bool = False,
) -> dict[str, Any]:
    """Runbook "Common Issues" 1-6 and "Performance Troubleshooting": gather the evidence, read-only.

    Every check runs at once, each under a deadline; a service that is down or hangs is a finding of
    its check, never a failed run. The report (markdown with the evidence, and a findings table) is
    published also when something unexpected fails.

    Args:
        long_query_seconds: report active queries running longer than this (default: the
            ``diagnose.long_query_seconds`` setting, 5 s).
        triggered_by: what started this run (an automation passes the health event); shown in the
            report.
        fail_on_critical: end the run Failed when a finding is critical.

    Returns:
        ``stack``, overall ``severity``, each check's severity and the findings, worst first.

    Raises:
        ParameterError: long_query_seconds is not positive.
        CheckFailed: a finding is critical and ``fail_on_critical`` is set (after the report).
    """
    settings = load_settings()
    if long_query_seconds is not None and long_query_seconds <= 0:
        raise ParameterError(
            "long_query_seconds must be positive (seconds), or unset for the setting's value"
        )
    logger = run_logger(__name__)
    started = datetime.now(UTC)
    results: list[Diagnosis] = []

    def report_of(run: reports.RunOutcome) -> DiagnoseReport:
        notes = (f"the run stopped early: {run.failure}",) if run.failure else ()
        return DiagnoseReport(settings.stack, started, tuple(results), triggered_by, notes)

    with reports.publishing(
        reports.RunOutcome(), lambda run: publish_report(report_of(run)), settings
    ) as run:
        names = list(diagnostics.all_diagnostics(settings, long_query_seconds))
        futures = [
            diagnostics.run_diagnostic_task.submit(name, settings, long_query_seconds) for name in names
        ]
        archive = diagnostics.wal_archive_task.submit(settings)
        for future in futures:
            results.append(future.result())
        if (wal := archive.result()) is not None:
            results.append(wal)
    report = report_of(run)
    for finding in report.findings(Severity.WARNING):
        logger.warning(
            "%s [%s] %s -> %s", finding.severity.value, finding.check, finding.summary, finding.flow
        )
    logger.info("diagnosis of %s: %s", report.stack, report.severity.value)
    if fail_on_critical and report.severity is Severity.CRITICAL:
        critical = "; ".join(f.summary for f in report.findings(Severity.CRITICAL))
        raise CheckFailed(f"{report.stack} has critical findings: {critical}. See the diagnose report.")
    return report.as_dict()


if __name__ == "__main__":
    import json

    print(json.dumps(diagnose(), indent=2))
