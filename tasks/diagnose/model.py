"""The finding model every check shares: severities, findings (with the runbook section they come
from, the runbook's resolution and the flow that performs it), a check's diagnosis and
the whole report. An error is worded in them as everywhere (:func:`tasks.secrets.safe_error`)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

# --- Runbook sections and the flows that perform their resolutions ----------------------------------

RB_DATABASE = "Common Issues 1: Database Connection Issues"
RB_REDIS = "Common Issues 2: Redis Connection Issues"
RB_WORKER = "Common Issues 3: Worker Not Processing Jobs"
RB_MEMORY = "Common Issues 4: High Memory Usage"
RB_SLOW = "Common Issues 5: Slow Response Times"
RB_UPLOADS = "Common Issues 6: File Upload Failures"
RB_CPU = "Performance Troubleshooting: High CPU Usage"
RB_DB_LOAD = "Performance Troubleshooting: High Database Load"
RB_NETWORK = "Performance Troubleshooting: Network Issues"

FLOW_RESTART = "restart-services"
FLOW_RETRY = "retry-failed-jobs"
FLOW_CLEAN_JOBS = "clean-jobs"
FLOW_CLEANUP_UPLOADS = "cleanup-uploads"
FLOW_OUTAGE = "outage-triage"
FLOW_SCALE = "scale-services"


class Severity(enum.StrEnum):
    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return {"ok": 0, "info": 1, "warning": 2, "critical": 3}[self.value]


def worst(severities: Sequence[Severity]) -> Severity:
    """The worst severity (ok when there is none)."""
    return max(severities, key=lambda s: s.rank, default=Severity.OK)


@dataclass(frozen=True)
class Finding:
    """One thing the evidence shows, what the runbook says to do about it, and which flow does it."""

    check: str
    severity: Severity
    summary: str
    runbook: str
    resolution: str | None = None
    flow: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "check": self.check,
            "finding": self.summary,
            "runbook": self.runbook,
            "resolution": self.resolution,
            "flow": self.flow,
        }


class Evidence(Protocol):
    """Typed evidence of one check; ``rows()`` is what its table shows."""

    def rows(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Diagnosis:
    """The outcome of one check: its evidence (None when it could not be gathered) and findings."""

    check: str
    title: str
    evidence: Evidence | None
    findings: tuple[Finding, ...] = ()
    error: str | None = None
    duration_ms: float = 0.0

    @property
    def severity(self) -> Severity:
        return worst([f.severity for f in self.findings])

    def rows(self) -> list[dict[str, Any]]:
        return self.evidence.rows() if self.evidence is not None else []


@dataclass(frozen=True)
class DiagnoseReport:
    """Every check's diagnosis, in one report."""

    stack: str
    started_at: datetime
    diagnoses: tuple[Diagnosis, ...]
    triggered_by: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def severity(self) -> Severity:
        return worst([d.severity for d in self.diagnoses])

    def findings(self, at_least: Severity = Severity.INFO) -> list[Finding]:
        """Findings at or above ``at_least``, worst first (then in check order)."""
        found = [f for d in self.diagnoses for f in d.findings if f.severity.rank >= at_least.rank]
        return sorted(found, key=lambda f: -f.severity.rank)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "severity": self.severity.value,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "triggered_by": self.triggered_by,
            "checks": {d.check: d.severity.value for d in self.diagnoses},
            "findings": [f.as_row() for f in self.findings()],
        }
