"""Runbook: "Certificate Renewal".

``certbot renew --dry-run``, then ``certbot renew``, then reload nginx (or restart it on Kubernetes) —
plus the step the runbook leaves out: proving that the server now serves the new certificate. A
renewal that nginx never reloads keeps the old certificate in memory until it expires.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks import reports
from tasks.certificates import (
    ReloadFailed,
    RenewalFailed,
    RunSummary,
    certbot_dry_run_task,
    plan_renewals,
    reload_server_task,
    renew_lineage_task,
    take_inventory_task,
    verify_endpoints_task,
)
from tasks.errors import CheckFailed
from tasks.runlog import run_logger
from tasks.settings import load_settings

EVENT_PREFIX = "swagger2mcp-ops.certificate"


def _date(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC" if value is not None else ""


def table_rows(summary: RunSummary) -> list[dict[str, Any]]:
    """One row per certificate and per endpoint, with days left and status."""
    rows: list[dict[str, Any]] = []
    inventory = summary.inventory
    if inventory is None:
        return rows
    renewed = {r.cert_name: r for r in summary.renewals}
    unrenewed = set(summary.unrenewed_due())
    due = set(summary.plan.due) if summary.plan else set()
    for cert in inventory.certificates:
        info = cert.info
        status = "ok"
        if cert.name in renewed:
            status = "renewed"
        elif cert.name in unrenewed:
            status = "due, not renewed"
        elif cert.name in due:
            status = "due (dry run)" if summary.dry_run else "due"
        record = renewed.get(cert.name)
        rows.append(
            {
                "kind": cert.kind,
                "name": cert.name,
                "names": ", ".join(info.sans),
                "issuer": info.issuer,
                "serial": record.new_serial if record else info.serial,
                "not_after": _date(record.new_not_after if record else info.not_after),
                "days_left": round(
                    (record.new_not_after - inventory.taken_at).total_seconds() / 86400
                    if record
                    else info.days_left(inventory.taken_at),
                    1,
                ),
                "status": status,
                "note": "",
            }
        )
    verdicts = {v.endpoint: v for v in summary.verdicts}
    for state in inventory.endpoints:
        served = state.served
        verdict = verdicts.get(served.endpoint)
        shown = verdict.served if verdict else served
        shown_info = shown.info
        if verdict is not None:
            status, note = ("ok", "") if verdict.ok else ("failed", verdict.problem or "")
        else:
            findings = [f for f in inventory.findings if f.subject == served.endpoint]
            status = findings[0].kind if findings else "ok"
            note = "; ".join(f.text for f in findings)
        rows.append(
            {
                "kind": "endpoint",
                "name": served.endpoint,
                "names": ", ".join(shown_info.sans) if shown_info else "",
                "issuer": shown_info.issuer if shown_info else "",
                "serial": shown_info.serial if shown_info else "",
                "not_after": _date(shown_info.not_after if shown_info else None),
                "days_left": round(shown_info.days_left(), 1) if shown_info else "",
                "status": status,
                "note": note,
            }
        )
    return rows


def render_markdown(summary: RunSummary) -> str:
    """The run as markdown: outcome, findings, what was done (commands), verification."""
    problems = summary.problems()
    mode = " (dry run)" if summary.dry_run else ""
    outcome = "failed" if problems else "ok"
    lines = [f"# Certificates of {summary.stack}{mode}: **{outcome}**", ""]
    inventory = summary.inventory
    if inventory is not None:
        lines.append(
            f"Checked {len(inventory.certificates)} certificate(s) and {len(inventory.endpoints)}"
            f" endpoint(s) at {_date(inventory.taken_at)}."
        )
    if summary.plan is not None:
        plan = summary.plan
        why = "forced" if summary.force else "under the threshold"
        lines.append(f"Due ({why}): {', '.join(plan.due) or 'none'}.")
        if plan.stale_endpoints:
            lines.append(f"Renewed but not reloaded: {', '.join(plan.stale_endpoints)}.")
    rows = table_rows(summary)
    if rows:
        lines += [
            "",
            reports.markdown_table(
                ["kind", "name", "serial", "not after", "days left", "status"],
                [
                    [r["kind"], r["name"], r["serial"], r["not_after"], r["days_left"], r["status"]]
                    for r in rows
                ],
            ),
        ]
    if inventory is not None and inventory.findings:
        lines += ["", "## Findings before the run", ""]
        lines += [f"- **{f.subject}** ({f.kind}): {f.text}" for f in inventory.findings]
    actions = [f"- dry run {'passed' if d.passed else 'FAILED'}: `{d.command}`" for d in summary.dry_runs]
    actions += [
        f"- renewed {r.cert_name}: serial {r.old_serial} -> {r.new_serial} (`{r.command}`)"
        for r in summary.renewals
    ]
    if summary.reload is not None:
        done = ", ".join(f"`{c}`" for c in summary.reload.commands) or "nothing run"
        actions.append(f"- reload ({summary.reload.method}): {done}")
    if actions:
        lines += ["", "## Actions", "", *actions]
    if summary.dry_run and summary.plan is not None and summary.plan.due:
        lines += ["", "Dry run: nothing was renewed or reloaded; run with dry_run=false to renew."]
    if problems:
        lines += ["", "## Problems", "", *[f"- {p}" for p in problems]]
    if summary.events_emitted:
        lines += [
            "",
            f"{summary.events_emitted} `{EVENT_PREFIX}.renewal-failed` event(s) emitted for:"
            f" {', '.join(summary.unrenewed_due())}.",
        ]
    return "\n".join(lines)


@task(name="publish-certificate-report", cache_policy=NO_CACHE)
def publish_report(summary: RunSummary) -> None:
    """Markdown summary and a table of every certificate and endpoint (stable keys per stack)."""
    reports.publish_markdown(
        f"certificates-{summary.stack}",
        render_markdown(summary),
        f"Certificate renewal of {summary.stack}",
    )
    reports.publish_table(
        f"certificates-{summary.stack}-table",
        table_rows(summary),
        "Certificates and endpoints with days left",
    )


@task(name="emit-certificate-event", cache_policy=NO_CACHE)
def emit_unrenewed_events(summary: RunSummary) -> int:
    """One event per certificate within the threshold that could not be renewed; returns how many."""
    if summary.inventory is None:
        return 0
    by_name = {c.name: c for c in summary.inventory.certificates}
    emitted = 0
    for name in summary.unrenewed_due():
        cert = by_name[name]
        reason = summary.renewal_errors.get(name)
        if reason is None:
            failed = [d for d in summary.dry_runs if d.cert_name == name and not d.passed]
            reason = failed[0].reason if failed else "not a certbot lineage"
        event = emit_event(
            event=f"{EVENT_PREFIX}.renewal-failed",
            resource={
                "prefect.resource.id": f"swagger2mcp-ops.stack.{summary.stack}.certificate.{name}",
                "prefect.resource.name": f"{summary.stack} certificate {name}",
                "swagger2mcp-ops.stack": summary.stack,
                "swagger2mcp-ops.certificate": name,
            },
            payload={
                "days_left": round(cert.info.days_left(), 1),
                "not_after": cert.info.not_after.isoformat(),
                "serial": cert.info.serial,
                "reason": reason[-500:],
            },
        )
        emitted += event is not None
    return emitted


# The escalation's rule: a certificate this close to its end with no successful renewal reaches DevOps.
EXPIRING_DAYS = 7


@task(name="emit-expiring-events", cache_policy=NO_CACHE)
def emit_expiring_events(summary: RunSummary) -> int:
    """One event per certificate or endpoint expiring within ``EXPIRING_DAYS`` days that this run did
    not renew; returns how many."""
    emitted = 0
    for subject, days_left in summary.expiring(EXPIRING_DAYS):
        event = emit_event(
            event=f"{EVENT_PREFIX}.expiring",
            resource={
                "prefect.resource.id": f"swagger2mcp-ops.stack.{summary.stack}.{subject.replace(' ', '.')}",
                "prefect.resource.name": f"{summary.stack} {subject}",
                "swagger2mcp-ops.stack": summary.stack,
            },
            payload={
                "message": f"{subject} expires in {days_left} days with no successful renewal",
                "subject": subject,
                "days_left": days_left,
                "within_days": EXPIRING_DAYS,
            },
        )
        emitted += event is not None
    return emitted


@flow(name="renew-certificates", log_prints=True)
def renew_certificates(force: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Runbook "Certificate Renewal": expiry check, certbot dry run then renew, reload, verify served.

    1. Inventory: every watched certificate (certbot lineage or PEM file) and the certificate each
       endpoint actually serves (TLS handshake, chain and name validated). A served certificate older
       than the file on disk is a finding: renewed but not reloaded.
    2. Decide: lineages with fewer than ``renew_threshold_days`` left, or every lineage when forced.
       A threshold above two thirds of a certificate's lifetime (e.g. 100 days with 90-day
       certificates) is capped there and reported as a warning: uncapped, every run would renew.
    3. ``certbot renew --dry-run`` per due lineage; only those that pass are renewed for real.
    4. Reload the server (nginx, Compose or Kubernetes, as the settings say) after a renewal, or when
       an endpoint serves an outdated certificate.
    5. Verify: every endpoint serves the certificate on disk, and a renewed one with enough days left
       (``min_days_after_renewal``, by default enough not to be due again).

    A markdown summary and a table of every certificate and endpoint are published, also on failure;
    a ``swagger2mcp-ops.certificate.renewal-failed`` event is emitted per certificate within the
    threshold that could not be renewed.

    Args:
        force: renew every lineage, due or not.
        dry_run: stop after the certbot dry runs (nothing renewed, nothing reloaded).

    Returns:
        A summary: due, renewed (old and new serials), reload commands, endpoints and what they serve.

    Raises:
        CheckFailed: a dry run or renewal failed, a due certificate cannot be renewed, or an endpoint
            does not serve the certificate on disk; the message names each endpoint and what it serves.
        CertificateFileError: a configured certificate path or lineage is bad (before any change).
    """
    settings = load_settings()
    cfg = settings.certificates
    logger = run_logger(__name__)
    summary = RunSummary(stack=settings.stack, force=force, dry_run=dry_run)
    with reports.publishing(summary, publish_report, settings):
        summary.inventory = take_inventory_task(cfg)
        for finding in summary.inventory.findings:
            logger.warning("%s (%s): %s", finding.subject, finding.kind, finding.text)
        summary.plan = plan = plan_renewals(summary.inventory, cfg.renew_threshold_days, force=force)
        logger.info("due: %s; stale endpoints: %s", list(plan.due), list(plan.stale_endpoints))

        passed = []
        for name in plan.due:
            result = certbot_dry_run_task(cfg, name)
            summary.dry_runs.append(result)
            if result.passed:
                passed.append(name)

        if not dry_run:
            for name in passed:
                try:
                    summary.renewals.append(renew_lineage_task(cfg, name))
                except RenewalFailed as exc:
                    summary.renewal_errors[name] = str(exc)
            if summary.renewals or plan.stale_endpoints:
                try:
                    summary.reload = reload_server_task(settings)
                except ReloadFailed as exc:
                    summary.reload_error = str(exc)
            # Waiting only makes sense when the server was told to load something new.
            wait = cfg.verify_timeout_seconds if summary.reload is not None else 0.0
            summary.verdicts = verify_endpoints_task(
                cfg, [r.cert_name for r in summary.renewals], wait_seconds=wait
            )
        if summary.unrenewed_due():
            summary.events_emitted = emit_unrenewed_events(summary)
        if not dry_run:
            summary.events_emitted += emit_expiring_events(summary)

    problems = summary.problems()
    if problems:
        raise CheckFailed(
            f"certificates of {settings.stack}: " + "; ".join(problems) + ". See the certificates report."
        )
    return {
        "due": list(plan.due),
        "renewed": [
            {"cert_name": r.cert_name, "old_serial": r.old_serial, "new_serial": r.new_serial}
            for r in summary.renewals
        ],
        "stale_endpoints": list(plan.stale_endpoints),
        "reload": list(summary.reload.commands) if summary.reload else None,
        "endpoints": {
            served.endpoint: served.info.serial if served.info else None
            for served in (
                [v.served for v in summary.verdicts]
                or [s.served for s in summary.inventory.endpoints if summary.inventory]
            )
        },
        "dry_runs": {d.cert_name: d.passed for d in summary.dry_runs},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(renew_certificates(), indent=2))
