"""The record of one renewal run, filled as the run goes, and what makes the run fail."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from tasks.certificates.certbot import DryRunResult, RenewalRecord
from tasks.certificates.decisions import Inventory, RenewalPlan
from tasks.certificates.proof import EndpointVerdict
from tasks.certificates.reload import ReloadRecord


@dataclass
class RunSummary:
    """Everything a renewal run did, for its report (filled as the run goes)."""

    stack: str
    force: bool
    dry_run: bool
    inventory: Inventory | None = None
    plan: RenewalPlan | None = None
    dry_runs: list[DryRunResult] = field(default_factory=list)
    renewals: list[RenewalRecord] = field(default_factory=list)
    renewal_errors: dict[str, str] = field(default_factory=dict)
    reload: ReloadRecord | None = None
    reload_error: str | None = None
    verdicts: list[EndpointVerdict] = field(default_factory=list)
    events_emitted: int = 0
    # Set by reports.publishing when the run stops on an error: its outcome and the masked error.
    outcome: str = "started"
    failure: str | None = None

    def unrenewed_due(self) -> list[str]:
        """Due certificates that this run could not renew (failed dry run or renew, or not renewable)."""
        if self.plan is None:
            return []
        failed_dry = [d.cert_name for d in self.dry_runs if not d.passed]
        return sorted({*failed_dry, *self.renewal_errors, *self.plan.not_renewable})

    def expiring(self, days: float, now: datetime | None = None) -> list[tuple[str, float]]:
        """What expires within ``days`` with no successful renewal in this run: watched certificates
        not renewed, and endpoints by what they serve after the run; ``(what, days left)`` each."""
        if self.inventory is None:
            return []
        now = now or datetime.now(UTC)
        renewed = {r.cert_name for r in self.renewals if r.changed}
        found = [
            (f"certificate {c.name}", round(c.info.days_left(now), 1))
            for c in self.inventory.certificates
            if c.name not in renewed and c.info.days_left(now) < days
        ]
        after = {v.endpoint: v.served for v in self.verdicts}
        for state in self.inventory.endpoints:
            served = after.get(state.served.endpoint, state.served)
            if served.info is not None and served.info.days_left(now) < days:
                found.append((f"endpoint {served.endpoint}", round(served.info.days_left(now), 1)))
        return found

    def problems(self) -> list[str]:
        """What makes the run fail, one line each."""
        out = []
        out += [
            f"dry run of {d.cert_name} failed, so it was not renewed: {d.reason}"
            for d in self.dry_runs
            if not d.passed
        ]
        out += [f"renewal of {name} failed: {text}" for name, text in self.renewal_errors.items()]
        if self.plan is not None:
            out += [f"{name} is due and certbot does not manage it" for name in self.plan.not_renewable]
        if self.reload_error:
            out.append(self.reload_error)
        out += [f"{v.endpoint}: {v.problem}" for v in self.verdicts if not v.ok]
        if self.dry_run and self.inventory is not None:
            out += [
                f"{f.subject}: {f.text}"
                for f in self.inventory.findings
                if f.kind in {"unreachable", "invalid", "uncovered"}
            ]
        if self.failure:
            out.append(self.failure)
        return out
