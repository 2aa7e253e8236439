"""The inventory: every watched certificate from disk and what every endpoint serves, with findings."""

from __future__ import annotations

from datetime import UTC, datetime

from tasks.certificates.decisions import (
    EndpointState,
    Finding,
    Inventory,
    certificate_findings,
    endpoint_findings,
)
from tasks.certificates.files import read_watched
from tasks.certificates.served import expected_certificate, probe_endpoint
from tasks.settings import CertificatesSettings


def take_inventory(cfg: CertificatesSettings, *, now: datetime | None = None) -> Inventory:
    """Read every watched certificate from disk and every endpoint's served certificate.

    Raises:
        CertificateFileError: a configured path or lineage is bad (nothing else is done).
    """
    now = now or datetime.now(UTC)
    watched = read_watched(cfg)
    expectations = [(e, expected_certificate(e, watched)) for e in cfg.endpoints]
    states = tuple(EndpointState(e, probe_endpoint(e, cfg), exp) for e, exp in expectations)
    findings: list[Finding] = []
    for cert in watched:
        findings.extend(certificate_findings(cert, cfg.renew_threshold_days, now))
    for state in states:
        findings.extend(endpoint_findings(state, cfg.renew_threshold_days, now))
    return Inventory(taken_at=now, certificates=tuple(watched), endpoints=states, findings=tuple(findings))
