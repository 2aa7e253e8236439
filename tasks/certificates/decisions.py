"""Renewal decisions: small pure functions over what the inventory read, no I/O.

Which certificate is due (:func:`should_renew`), what an operator should know about each certificate
and endpoint (:class:`Finding`), and what a run will do (:func:`plan_renewals`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from tasks.certificates.files import CertificateInfo, WatchedCertificate
from tasks.certificates.served import ServedCertificate
from tasks.settings import CertEndpoint, CertificatesSettings

FindingKind = Literal[
    "not-reloaded",
    "unexpected-certificate",
    "unreachable",
    "invalid",
    "uncovered",
    "due",
    "not-renewable",
    "threshold-capped",
]

# A certificate is never due in the first third of its life (unless forced). A threshold at or above
# the lifetime the CA issues would make a certificate due the moment it is issued: every run would
# renew it again, into the CA's rate limits. "Renew early" still renews early: at two thirds of the
# lifetime left, i.e. at most once per third of a lifetime.
_LONGEST_THRESHOLD_THIRDS = 2


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


def renewal_threshold(info: CertificateInfo, threshold_days: float) -> float:
    """The threshold that applies to one certificate: ``threshold_days``, but at most two thirds of
    the certificate's lifetime, so that a certificate is never due in the first third of its life."""
    return min(threshold_days, info.lifetime_days * _LONGEST_THRESHOLD_THIRDS / 3)


def renewal_minimum_days(info: CertificateInfo, cfg: CertificatesSettings) -> float:
    """Days a renewed certificate (``info``, as issued) must have left when it is served.

    ``min_days_after_renewal`` when set; else the threshold that applies to the certificate, so that
    the next run does not find it due again. Not ``renew_threshold_days`` itself: a threshold set to
    renew early may exceed what the CA issues, and a fresh certificate would then fail its own proof.
    """
    if cfg.min_days_after_renewal is not None:
        return cfg.min_days_after_renewal
    return renewal_threshold(info, cfg.renew_threshold_days)


def certificate_findings(cert: WatchedCertificate, threshold_days: float, now: datetime) -> list[Finding]:
    """The findings about one watched certificate: a threshold its lifetime caps, and due for renewal
    (or due and not renewable here)."""
    found = []
    threshold = renewal_threshold(cert.info, threshold_days)
    if threshold < threshold_days:
        found.append(_capped_finding(cert, threshold_days, threshold))
    if not should_renew(cert.info.not_after, now, threshold, force=False):
        return found
    left = cert.info.days_left(now)
    if cert.renewable:
        text = f"{left:.1f} days left (threshold {threshold:g}); due for renewal"
        found.append(Finding("due", cert.name, text))
        return found
    text = (
        f"{left:.1f} days left (threshold {threshold:g}) and not a certbot lineage:"
        " renew it by hand or manage it with certbot"
    )
    found.append(Finding("not-renewable", cert.name, text))
    return found


def _capped_finding(cert: WatchedCertificate, threshold_days: float, threshold: float) -> Finding:
    """A warning: the configured threshold would renew this certificate too often, the cap applies."""
    lifetime = cert.info.lifetime_days
    often = "at every run" if threshold_days >= lifetime else f"every {lifetime - threshold_days:.0f} days"
    return Finding(
        "threshold-capped",
        cert.name,
        f"renew_threshold_days {threshold_days:g} would renew this {lifetime:.0f}-day certificate {often};"
        f" it is renewed with {threshold:.1f} days left instead (never in the first third of its life);"
        f" set OPS_CERTIFICATES__RENEW_THRESHOLD_DAYS to {math.floor(threshold)} or less to silence this",
    )


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
    threshold = renewal_threshold(served.info, threshold_days) if threshold_days is not None else None
    if expected is None and threshold is not None and left < threshold:
        found.append(
            Finding(
                "uncovered",
                served.endpoint,
                f"serves serial {served.info.serial} with {left:.1f} days left (threshold {threshold:g})"
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
    """Decide: lineages due (or all lineages when forced), stale endpoints, due files certbot cannot renew.

    Each certificate is due under the threshold that applies to it (:func:`renewal_threshold`).
    """
    due, not_renewable = [], []
    for cert in inventory.certificates:
        threshold = renewal_threshold(cert.info, threshold_days)
        if cert.renewable and should_renew(cert.info.not_after, inventory.taken_at, threshold, force):
            due.append(cert.name)
        elif not cert.renewable and should_renew(cert.info.not_after, inventory.taken_at, threshold):
            not_renewable.append(cert.name)
    stale = [s.served.endpoint for s in inventory.endpoints if s.stale]
    return RenewalPlan(due=tuple(due), stale_endpoints=tuple(stale), not_renewable=tuple(not_renewable))
