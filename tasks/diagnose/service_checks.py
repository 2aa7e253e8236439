"""Service checks through the :class:`~tasks.runtime.Runtime` (Compose or Kubernetes): status,
restarts, the tail of each service's logs scanned for error and memory patterns, and resource usage
(runbook "Detailed Service Checks", Common Issues 3 and 4, Performance "High CPU Usage")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasks.diagnose.model import (
    FLOW_OUTAGE,
    FLOW_RESTART,
    FLOW_SCALE,
    RB_CPU,
    RB_DATABASE,
    RB_MEMORY,
    RB_WORKER,
    Diagnosis,
    Finding,
    Severity,
)
from tasks.runtime import ResourceUsage, Runtime, ServiceStatus, get_runtime
from tasks.scaling import approval_reason, suggest_replicas
from tasks.secrets import configured_secrets, mask_text, one_line, safe_error
from tasks.settings import DiagnoseSettings, OpsSettings, ScalingSettings

CHECK = "services"


@dataclass(frozen=True)
class LogTail:
    service: str
    lines: int
    matches: tuple[str, ...]  # matching lines (masked), newest last
    error: str | None = None


@dataclass(frozen=True)
class ServicesEvidence:
    runtime: str
    services: tuple[ServiceStatus, ...]
    usage: tuple[ResourceUsage, ...]
    logs: tuple[LogTail, ...]

    def rows(self) -> list[dict[str, Any]]:
        usage = {u.name: u for u in self.usage}
        logs = {t.service: t for t in self.logs}
        rows = []
        for s in self.services:
            u = usage.get(s.name)
            t = logs.get(s.name)
            rows.append(
                {
                    "service": s.name,
                    "state": s.state,
                    "ready": f"{s.ready}/{s.desired}",
                    "restarts": s.restarts,
                    "image": s.image,
                    "cpu_percent": None if u is None or u.cpu_percent is None else round(u.cpu_percent, 1),
                    "memory_mib": None
                    if u is None or u.memory_bytes is None
                    else round(u.memory_bytes / 2**20, 1),
                    "log_matches": None if t is None else len(t.matches),
                }
            )
        return rows


def scan_log(service: str, text: str, patterns: Sequence[str], secrets: Sequence[str] = ()) -> LogTail:
    """The lines of a log tail that match any pattern (the runbook's ``grep -i "memory\\|heap"``)."""
    compiled = [re.compile(p) for p in patterns]
    lines = text.splitlines()
    matches = [
        mask_text(one_line(line, 300), secrets) for line in lines if any(c.search(line) for c in compiled)
    ]
    return LogTail(service=service, lines=len(lines), matches=tuple(matches))


def _missing_findings(evidence: ServicesEvidence, expected: Sequence[str]) -> list[Finding]:
    """A configured service the runtime does not find, or lists with state "missing"."""
    present = {s.name for s in evidence.services}
    missing = {s.name for s in evidence.services if s.state == "missing"}
    return [
        Finding(
            CHECK,
            Severity.CRITICAL,
            f"service {name} is not running at all (not found by the {evidence.runtime} runtime)",
            RB_WORKER if name == "worker" else RB_DATABASE,
            "Start it; if everything is down follow Total Service Outage",
            FLOW_OUTAGE,
        )
        for name in expected
        if name not in present or name in missing
    ]


def _one_service_findings(s: ServiceStatus, tail: LogTail | None, limits: DiagnoseSettings) -> list[Finding]:
    """Scaled to 0 or not ready, restarts, matching log lines: in that order."""
    findings: list[Finding] = []
    runbook = RB_WORKER if "worker" in s.name else RB_MEMORY
    if s.desired == 0:
        findings.append(
            Finding(
                CHECK, Severity.WARNING, f"service {s.name} is scaled to 0", runbook, "Scale it back", None
            )
        )
    elif not s.healthy:
        findings.append(
            Finding(
                CHECK,
                Severity.CRITICAL,
                f"service {s.name} is {s.state}: {s.ready} of {s.desired} ready",
                runbook,
                f"Restart {s.name} (docker compose restart {s.name} / kubectl rollout restart)",
                FLOW_RESTART,
            )
        )
    if s.restarts >= limits.restarts_warn:
        findings.append(
            Finding(
                CHECK,
                Severity.WARNING,
                f"service {s.name} restarted {s.restarts} times (OOM kills show as restarts)",
                RB_MEMORY,
                "Restart the affected service; increase memory limits if the usage is legitimate;"
                " investigate a memory leak (heap profiling, unclosed connections, recent changes)",
                FLOW_RESTART,
            )
        )
    if tail is not None and tail.matches:
        findings.append(
            Finding(
                CHECK,
                Severity.INFO,
                f"{len(tail.matches)} of the last {tail.lines} log lines of {s.name} match error/memory"
                f" patterns; newest: {tail.matches[-1][:160]}",
                RB_MEMORY,
                "Read the log excerpt in the report",
                None,
            )
        )
    return findings


def _cpu_finding(name: str, cpu_percent: float, current: int, scaling: ScalingSettings) -> Finding:
    """A service over the CPU threshold, with the replica count scale-services would bring it to."""
    bounds = scaling.bounds.get(name)
    suggestion = suggest_replicas(name, current, cpu_percent, scaling.cpu_target_percent, bounds)
    each = f"about {scaling.cpu_target_percent:g}% CPU each"

    def command(replicas: int) -> str:
        return f"scale-services -p replicas='{{\"{name}\": {replicas}}}' -p dry_run=false"

    if bounds is not None and suggestion.at_max:
        action = (
            f"{name} is already at its max of {bounds.max} replicas ({suggestion.wanted} would give {each}):"
            f" raise its max in OPS_SCALING__BOUNDS, or run {command(suggestion.wanted)} and approve it"
        )
    else:
        capped = f", capped by its max {bounds.max}" if bounds and suggestion.wanted > bounds.max else ""
        why = approval_reason(suggestion.current, suggestion.replicas, bounds)
        gate = f"asks for approval: {why}" if why else "within its bounds: no approval needed"
        action = (
            f"scale {name} from {suggestion.current} to {suggestion.replicas} replicas ({each}{capped}):"
            f" run {command(suggestion.replicas)} ({gate})"
        )
    return Finding(
        CHECK,
        Severity.WARNING,
        f"service {name} uses {cpu_percent:.0f}% CPU over {current} replica{'s' if current != 1 else ''}",
        RB_CPU,
        "Check for CPU-intensive work (large files, schema parsing, loops); if the load is legitimate, "
        + action,
        FLOW_SCALE,
    )


def _cpu_findings(
    usage: Sequence[ResourceUsage],
    statuses: Sequence[ServiceStatus],
    limits: DiagnoseSettings,
    scaling: ScalingSettings,
) -> list[Finding]:
    replicas = {s.name: s.desired for s in statuses}
    return [
        _cpu_finding(u.name, u.cpu_percent, replicas.get(u.name, 1), scaling)
        for u in usage
        if u.cpu_percent is not None and u.cpu_percent >= limits.cpu_warn_percent
    ]


def service_findings(
    evidence: ServicesEvidence,
    expected: Sequence[str],
    limits: DiagnoseSettings,
    scaling: ScalingSettings | None = None,
) -> list[Finding]:
    """Findings from services' status, restarts, logs and resource usage (a pure function).

    A service over the CPU threshold names scale-services with a replica count sized by
    ``scaling.cpu_target_percent`` and capped by the service's max bound.
    """
    if evidence.runtime == "none":
        return [
            Finding(
                CHECK,
                Severity.INFO,
                "runtime kind is 'none': service status, restarts, logs and resource usage are not"
                " collected; set OPS_RUNTIME__KIND to compose or kubernetes",
                RB_MEMORY,
            )
        ]
    findings = _missing_findings(evidence, expected)
    logs = {t.service: t for t in evidence.logs}
    for s in evidence.services:
        # A runtime may list a configured service it cannot find with state "missing".
        if s.state != "missing":
            findings += _one_service_findings(s, logs.get(s.name), limits)
    findings += _cpu_findings(evidence.usage, evidence.services, limits, scaling or ScalingSettings())
    if not findings:
        findings.append(
            Finding(CHECK, Severity.OK, f"{len(evidence.services)} services running and ready", RB_MEMORY)
        )
    return findings


def _log_tails(runtime: Runtime, statuses: Sequence[ServiceStatus], settings: OpsSettings) -> list[LogTail]:
    """Each found service's log tail, scanned; a log that cannot be read is a tail with its error."""
    limits = settings.diagnose
    secrets = configured_secrets(settings)
    tails = []
    if limits.log_tail_lines:
        for status in statuses:
            if status.state == "missing":
                continue
            try:
                text = runtime.logs(status.name, tail=limits.log_tail_lines)
            except Exception as exc:
                tails.append(LogTail(status.name, 0, (), error=safe_error(exc, settings)))
                continue
            tails.append(scan_log(status.name, text, limits.log_patterns, secrets))
    return tails


def services(settings: OpsSettings) -> Diagnosis:
    """Runbook "Detailed Service Checks" / 4: status, restarts, log tails and resource usage."""
    check, title = CHECK, "Services"
    try:
        runtime = get_runtime(settings)
        statuses = runtime.list_services()
    except Exception as exc:
        text = safe_error(exc, settings)
        finding = Finding(
            check,
            Severity.WARNING,
            f"the {settings.runtime.kind} runtime cannot list the services: {text}",
            RB_WORKER,
            "Check the runtime's API (Docker Engine socket, Kubernetes credentials and namespace)",
            None,
        )
        return Diagnosis(check, title, None, (finding,), error=text)
    try:
        usage = runtime.resource_usage()
    except Exception as exc:
        # Metrics are optional (no metrics API, stats refused): the rest of the evidence still counts.
        usage = [ResourceUsage(name="*", cpu_percent=None, memory_bytes=None, available=False, note=str(exc))]
    tails = _log_tails(runtime, statuses, settings)
    evidence = ServicesEvidence(runtime.kind, tuple(statuses), tuple(usage), tuple(tails))
    return Diagnosis(
        check,
        title,
        evidence,
        tuple(service_findings(evidence, settings.runtime.services, settings.diagnose, settings.scaling)),
    )
