"""Renewal decisions: small pure functions over what the inventory read, no I/O.

Which certificate is due (:func:`should_renew`), what an operator should know about each certificate
and endpoint (:class:`Finding`), and what a run will do (:func:`plan_renewals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from tasks.certificates.files import CertificateInfo, WatchedCertificate
from tasks.certificates.served import ServedCertificate
from tasks.settings import CertEndpoint

FindingKind = Literal[
    "not-reloaded", "unexpected-certificate", "unreachable", "invalid", "uncovered", "due", "not-renewable"
]


@dataclass(frozen=True)
class Finding:
    """Something the inventory found that an operator should know about."""

    kind: FindingKind
    subject: str
    text: str


@dataclass(frozen=True)
class EndpointState:
    """An endpoint, what it serves, and which watched certificate it should serve."""

    endpoint: CertEndpoint
    served: ServedCertificate
    expected: WatchedCertificate | None

    @property
    def stale(self) -> bool:
        """Serves an older certificate than the one on disk: renewed but not reloaded."""
        info = self.served.info
        return (
            info is not None
            and self.expected is not None
            and info.serial != self.expected.info.serial
            and self.expected.info.not_after > info.not_after
        )


@dataclass(frozen=True)
class Inventory:
    """Every watched certificate and endpoint at one moment, with the findings."""

    taken_at: datetime
    certificates: tuple[WatchedCertificate, ...]
    endpoints: tuple[EndpointState, ...]
    findings: tuple[Finding, ...]


def should_renew(not_after: datetime, now: datetime, threshold_days: float, force: bool = False) -> bool:
    """Renew when forced, or when fewer than ``threshold_days`` are left before ``not_after``."""
    return force or not_after - now < timedelta(days=threshold_days)


def certificate_findings(cert: WatchedCertificate, threshold_days: float, now: datetime) -> list[Finding]:
    """The finding about one watched certificate: due for renewal, or due and not renewable here."""
    if not should_renew(cert.info.not_after, now, threshold_days, force=False):
        return []
    left = cert.info.days_left(now)
    if cert.renewable:
        text = f"{left:.1f} days left (threshold {threshold_days}); due for renewal"
        return [Finding("due", cert.name, text)]
    text = (
        f"{left:.1f} days left (threshold {threshold_days}) and not a certbot lineage:"
        " renew it by hand or manage it with certbot"
    )
    return [Finding("not-renewable", cert.name, text)]


def endpoint_findings(
    state: EndpointState, threshold_days: float | None = None, now: datetime | None = None
) -> list[Finding]:
    """The findings about one endpoint: unreachable, invalid, not serving the certificate on disk, or
    serving a certificate within ``threshold_days`` of expiry that no watched certificate covers."""
    served, expected = state.served, state.expected
    found = []
    if served.info is None:
        found.append(Finding("unreachable", served.endpoint, served.error or "no certificate read"))
        return found
    if not served.valid:
        found.append(Finding("invalid", served.endpoint, served.error or "certificate does not validate"))
    left = served.info.days_left(now)
    if expected is None and threshold_days is not None and left < threshold_days:
        found.append(
            Finding(
                "uncovered",
                served.endpoint,
                f"serves serial {served.info.serial} with {left:.1f} days left (threshold {threshold_days:g})"
                f" and no watched certificate covers {served.server_name}; nothing here will renew it",
            )
        )
    if expected is not None and served.info.serial != expected.info.serial:
        found.append(_mismatch_finding(state, served.info, expected))
    return found


def _mismatch_finding(state: EndpointState, info: CertificateInfo, expected: WatchedCertificate) -> Finding:
    """An endpoint serves another serial than the file on disk: an older one (renewed but not
    reloaded) or one the server was never configured with."""
    endpoint = state.served.endpoint
    if state.stale:
        return Finding(
            "not-reloaded",
            endpoint,
            f"renewed but not reloaded: serves serial {info.serial} (not after"
            f" {info.not_after:%Y-%m-%d %H:%M} UTC) while {expected.path} holds serial"
            f" {expected.info.serial} (not after {expected.info.not_after:%Y-%m-%d %H:%M} UTC);"
            " the server must reload its certificates",
        )
    return Finding(
        "unexpected-certificate",
        endpoint,
        f"serves serial {info.serial}, not {expected.name} (serial"
        f" {expected.info.serial}); check the server's ssl_certificate path",
    )


@dataclass(frozen=True)
class RenewalPlan:
    """What a run will do: lineages to renew, endpoints to reload for, certificates it cannot renew."""

    due: tuple[str, ...]
    stale_endpoints: tuple[str, ...]
    not_renewable: tuple[str, ...]

    @property
    def needs_reload(self) -> bool:
        return bool(self.due or self.stale_endpoints)


def plan_renewals(inventory: Inventory, threshold_days: float, force: bool = False) -> RenewalPlan:
    """Decide: lineages due (or all lineages when forced), stale endpoints, due files certbot cannot renew."""
    due, not_renewable = [], []
    for cert in inventory.certificates:
        if cert.renewable and should_renew(cert.info.not_after, inventory.taken_at, threshold_days, force):
            due.append(cert.name)
        elif not cert.renewable and should_renew(cert.info.not_after, inventory.taken_at, threshold_days):
            not_renewable.append(cert.name)
    stale = [s.served.endpoint for s in inventory.endpoints if s.stale]
    return RenewalPlan(due=tuple(due), stale_endpoints=tuple(stale), not_renewable=tuple(not_renewable))
