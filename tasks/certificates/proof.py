"""Proof of the served certificate: after a run, every endpoint must serve the certificate on disk,
validly, and a renewed one with enough days left. Evidence, not certbot's exit code."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from tasks.certificates.decisions import renewal_minimum_days, renewal_threshold
from tasks.certificates.files import WatchedCertificate, read_watched
from tasks.certificates.served import ServedCertificate, expected_certificate, probe_endpoint
from tasks.settings import CertEndpoint, CertificatesSettings

# How often the served certificate is read again while waiting for a reload to take effect.
_STABLE_HANDSHAKES = 3
_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class EndpointVerdict:
    """Verification of one endpoint after the run: what it serves and whether that is right."""

    endpoint: str
    served: ServedCertificate
    expected_serial: str | None
    ok: bool
    problem: str | None = None


def judge_endpoint(
    served: ServedCertificate,
    expected: WatchedCertificate | None,
    min_days: float | None,
    now: datetime | None = None,
) -> EndpointVerdict:
    """Whether an endpoint serves the certificate on disk, validly, with at least ``min_days`` left.

    For an endpoint no watched certificate covers, ``min_days`` is the renew threshold, capped by the
    served certificate's lifetime like any watched certificate's (see ``renewal_threshold``).
    """
    info = served.info
    expected_serial = expected.info.serial if expected else None
    if info is not None and expected is None and min_days is not None:
        min_days = renewal_threshold(info, min_days)
    problem = None
    if info is None:
        problem = served.error or "no certificate read"
    elif not served.valid:
        problem = served.error or "the served certificate does not validate"
    elif expected is not None and info.serial != expected.info.serial:
        problem = (
            f"still serves serial {info.serial} (not after {info.not_after:%Y-%m-%d %H:%M} UTC,"
            f" {info.days_left(now):.1f} days left), not the certificate on disk {expected.path}"
            f" (serial {expected.info.serial}); the server has not loaded it: check that its"
            " ssl_certificate names this file and that the reload reached it (error log)"
        )
    elif min_days is not None and info.days_left(now) < min_days:
        if expected is None:
            problem = (
                f"serves serial {info.serial} with {info.days_left(now):.1f} days left (threshold"
                f" {min_days:g}) and no watched certificate covers {served.server_name}: add its certbot"
                " lineage or PEM file to the certificates settings, or renew it by hand"
            )
        else:
            problem = (
                f"serves serial {info.serial} with only {info.days_left(now):.1f} days left (at least"
                f" {min_days:g} wanted after renewal, so that it is not due again); is the CA issuing"
                " shorter certificates than OPS_CERTIFICATES__MIN_DAYS_AFTER_RENEWAL, or did certbot"
                " install an old one?"
            )
    return EndpointVerdict(served.endpoint, served, expected_serial, problem is None, problem)


def verify_endpoints(
    cfg: CertificatesSettings,
    renewed: Iterable[str] = (),
    *,
    wait_seconds: float = 0.0,
) -> list[EndpointVerdict]:
    """Read every endpoint's served certificate and judge it against the certificates on disk now.

    Endpoints serving a certificate renewed in this run must have ``min_days_after_renewal`` left
    (default: enough not to be due again, see ``renewal_minimum_days``); an endpoint no watched
    certificate covers must have more than the threshold left, since nothing here would renew it.
    After a reload the server may take a moment to switch: endpoints are read again until they pass
    or ``wait_seconds`` have passed.

    Raises:
        CertificateFileError: a configured path or lineage is bad.
    """
    renewed = set(renewed)
    watched = read_watched(cfg)
    # One deadline for all endpoints: the server switches once, not once per endpoint.
    deadline = time.monotonic() + wait_seconds
    # After a reload, old nginx workers may still answer a handshake or two while they drain: a
    # switch counts once several handshakes in a row show it.
    needed = _STABLE_HANDSHAKES if wait_seconds > 0 else 1
    verdicts = []
    for endpoint in cfg.endpoints:
        expected = expected_certificate(endpoint, watched)
        if expected is None:
            min_days: float | None = cfg.renew_threshold_days
        else:
            min_days = renewal_minimum_days(expected.info, cfg) if expected.name in renewed else None
        verdicts.append(_judge_until_stable(endpoint, cfg, expected, min_days, needed, deadline))
    return verdicts


def _judge_until_stable(
    endpoint: CertEndpoint,
    cfg: CertificatesSettings,
    expected: WatchedCertificate | None,
    min_days: float | None,
    needed: int,
    deadline: float,
) -> EndpointVerdict:
    """Judge the endpoint until ``needed`` verdicts in a row pass, or ``deadline`` (monotonic) passes."""
    in_a_row = 0
    while True:
        verdict = judge_endpoint(probe_endpoint(endpoint, cfg), expected, min_days)
        in_a_row = in_a_row + 1 if verdict.ok else 0
        if in_a_row >= needed or time.monotonic() >= deadline:
            return verdict
        time.sleep(_POLL_SECONDS)
