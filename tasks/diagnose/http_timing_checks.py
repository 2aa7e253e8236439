"""Response times of the app's endpoints (runbook Common Issues 5 "Check response times", which runs
``curl -w`` with ``time_namelookup``, ``time_connect`` and ``time_total``).

Each configured endpoint (``health.urls`` and ``runtime.smoke_urls``) is requested several times, and
each request is timed phase by phase, the way curl splits it: name lookup, TCP connect, TLS
handshake, waiting for the first byte (the server's time) and reading the rest. The report shows the
median and the worst of each phase, flags an endpoint slower than the runbook's 1 second and says
which phase dominates, so that the finding points at DNS, the network, TLS or the application.

The phases are measured with the standard library: httpx's trace extension does not separate the
name lookup from the TCP connect.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import statistics
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from tasks.diagnose.deadline import with_deadline
from tasks.diagnose.model import FLOW_RESTART, RB_NETWORK, RB_SLOW, Diagnosis, Finding, Severity
from tasks.secrets import mask_url
from tasks.settings import OpsSettings

PHASES = ("dns", "connect", "tls", "first_byte", "transfer")
PHASE_NAMES = {
    "dns": "DNS lookup",
    "connect": "TCP connect",
    "tls": "TLS handshake",
    "first_byte": "first byte (server time)",
    "transfer": "transfer",
}
_USER_AGENT = "swagger2mcp-ops-diagnose"
# Part of the check's deadline the samples may use; the rest is left for reporting.
_BUDGET_SHARE = 0.8


@dataclass(frozen=True)
class TimingSample:
    """One timed GET. Phase durations in ms (None: not reached, or no TLS); ``total_ms`` is wall time.

    ``first_byte_ms`` runs from the request sent until the response's status line and headers
    arrived (curl's ``time_starttransfer`` minus ``time_pretransfer``); ``transfer_ms`` reads the body.
    """

    dns_ms: float | None
    connect_ms: float | None
    tls_ms: float | None
    first_byte_ms: float | None
    transfer_ms: float | None
    total_ms: float
    status: int | None
    size: int = 0
    error: str | None = None
    failed_phase: str | None = None

    def phase_ms(self, phase: str) -> float | None:
        return {
            "dns": self.dns_ms,
            "connect": self.connect_ms,
            "tls": self.tls_ms,
            "first_byte": self.first_byte_ms,
            "transfer": self.transfer_ms,
            "total": self.total_ms,
        }[phase]


@dataclass(frozen=True)
class EndpointTiming:
    """Every sample of one endpoint (its URL with the password masked)."""

    url: str
    samples: tuple[TimingSample, ...]
    wanted: int
    note: str | None = None

    @property
    def answered(self) -> list[TimingSample]:
        return [s for s in self.samples if s.error is None]

    @property
    def failed(self) -> list[TimingSample]:
        return [s for s in self.samples if s.error is not None]

    def _values(self, phase: str) -> list[float]:
        return [v for s in self.answered if (v := s.phase_ms(phase)) is not None]

    def median(self, phase: str) -> float | None:
        """Median of ``phase`` (or ``total``) over the answered samples; None when none has it."""
        values = self._values(phase)
        return round(statistics.median(values), 2) if values else None

    def worst(self, phase: str) -> float | None:
        values = self._values(phase)
        return round(max(values), 2) if values else None

    @property
    def dominant(self) -> str | None:
        """The phase with the largest median: where the time goes."""
        medians = {p: m for p in PHASES if (m := self.median(p)) is not None}
        return max(medians, key=lambda p: medians[p]) if medians else None

    @property
    def statuses(self) -> str:
        return ", ".join(sorted({str(s.status) for s in self.answered}))


@dataclass(frozen=True)
class ResponseTimesEvidence:
    endpoints: tuple[EndpointTiming, ...]

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for e in self.endpoints:
            for stat, pick in (("median", e.median), ("worst", e.worst)):
                rows.append(
                    {
                        "endpoint": e.url,
                        "stat": stat,
                        "samples": f"{len(e.answered)}/{e.wanted}",
                        "status": e.statuses,
                        **{f"{p}_ms": pick(p) for p in PHASES},
                        "total_ms": pick("total"),
                        "dominant": PHASE_NAMES[e.dominant].split(" (")[0] if e.dominant else None,
                        "errors": "; ".join(dict.fromkeys(s.error or "" for s in e.failed)) or e.note,
                    }
                )
        return rows


def timing_endpoints(settings: OpsSettings) -> list[str]:
    """The endpoints timed: the health URLs, then the smoke URLs, each once."""
    return list(dict.fromkeys([*settings.health.urls, *settings.runtime.smoke_urls]))


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 2)


class _Timeout(TimeoutError):
    pass


def time_request(url: str, timeout: float, context: ssl.SSLContext | None = None) -> TimingSample:
    """One GET of ``url``, timed phase by phase; a failure is a sample naming the phase it failed in.

    Args:
        url: an http(s) URL; a user and password in it are sent as basic authentication.
        timeout: time limit of the whole request, seconds.
        context: TLS context for https (default: the system's trust store, ``SSL_CERT_FILE`` honoured).

    Returns:
        The sample; redirects are not followed (their own time is what is measured).
    """
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    started = time.perf_counter()
    deadline = started + timeout

    def remaining() -> float:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise _Timeout(f"no answer within {timeout:g} s")
        return left

    marks: dict[str, float] = {}
    phase = "dns"
    sock: socket.socket | None = None
    connection: http.client.HTTPConnection | None = None
    status: int | None = None
    size = 0
    try:
        infos = with_deadline(
            lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
            remaining(),
        )
        marks["dns"] = time.perf_counter()
        phase = "connect"
        sock = _connect(infos, remaining)
        marks["connect"] = time.perf_counter()
        if https:
            phase = "tls"
            sock.settimeout(remaining())
            sock = (context or ssl.create_default_context()).wrap_socket(sock, server_hostname=host)
            marks["tls"] = time.perf_counter()
        phase = "first_byte"
        connection = http.client.HTTPConnection(host, port)
        connection.sock = sock  # already connected (and wrapped): the request goes over it as is
        sock.settimeout(remaining())
        connection.request("GET", _target(parts), headers=_headers(parts))
        response = connection.getresponse()
        status = response.status
        marks["first_byte"] = time.perf_counter()
        phase = "transfer"
        while chunk := response.read1(65536):
            size += len(chunk)
            sock.settimeout(remaining())
        marks["transfer"] = time.perf_counter()
    except (OSError, http.client.HTTPException, UnicodeError) as exc:
        error = f"{PHASE_NAMES[phase]}: {type(exc).__name__}: {exc}"
        return _sample(started, marks, https, status, size, error, phase)
    finally:
        if connection is not None:
            connection.close()
        elif sock is not None:
            sock.close()
    return _sample(started, marks, https, status, size, None, None)


def _connect(infos: list[Any], remaining: Any) -> socket.socket:
    """Connect to the first address that accepts, in the resolver's order (as curl and nc do)."""
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(remaining())
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last or OSError("the name resolved to no address")


def _target(parts: Any) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _headers(parts: Any) -> dict[str, str]:
    headers = {"User-Agent": _USER_AGENT, "Accept": "*/*", "Connection": "close"}
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
    return headers


def _sample(
    started: float,
    marks: dict[str, float],
    https: bool,
    status: int | None,
    size: int,
    error: str | None,
    failed_phase: str | None,
) -> TimingSample:
    ended = time.perf_counter()
    durations: dict[str, float | None] = {}
    previous = started
    for phase in PHASES:
        if phase == "tls" and not https:
            durations[phase] = None
            continue
        if phase in marks:
            durations[phase] = _ms(previous, marks[phase])
            previous = marks[phase]
        elif phase == failed_phase:
            durations[phase] = _ms(previous, ended)  # the time spent until it failed
        else:
            durations[phase] = None
    return TimingSample(
        dns_ms=durations["dns"],
        connect_ms=durations["connect"],
        tls_ms=durations["tls"],
        first_byte_ms=durations["first_byte"],
        transfer_ms=durations["transfer"],
        total_ms=_ms(started, ended),
        status=status,
        size=size,
        error=error,
        failed_phase=failed_phase,
    )


def time_endpoint(url: str, samples: int, timeout: float, budget_end: float) -> EndpointTiming:
    """``samples`` timed requests of ``url``, one after the other, within the check's budget.

    A request that ran into its time limit ends the sampling of this endpoint: more of them would
    only spend the check's deadline on what one already shows.
    """
    taken: list[TimingSample] = []
    note = None
    for _ in range(samples):
        left = budget_end - time.perf_counter()
        if left <= 0.05:
            note = f"{len(taken)} of {samples} samples taken within the check's deadline"
            break
        sample = time_request(url, min(timeout, left))
        taken.append(sample)
        if sample.error is not None and ("timed out" in sample.error or "no answer within" in sample.error):
            note = "sampling stopped after a request ran into its time limit"
            break
    return EndpointTiming(mask_url(url), tuple(taken), samples, note)


def response_times(settings: OpsSettings) -> Diagnosis:
    """Runbook 5 "Check response times": every configured endpoint, phase by phase, median and worst."""
    check, title = "response-times", "Response times"
    limits = settings.diagnose
    budget_end = time.perf_counter() + limits.check_deadline_seconds * _BUDGET_SHARE
    evidence = ResponseTimesEvidence(
        tuple(
            time_endpoint(url, limits.http_samples, limits.http_timeout_seconds, budget_end)
            for url in timing_endpoints(settings)
        )
    )
    return Diagnosis(check, title, evidence, tuple(response_time_findings(evidence, limits.http_slow_ms)))


# What the runbook (and the phase's nature) says to do when that phase takes the time.
_RESOLUTIONS: dict[str, tuple[str, str, str | None]] = {
    "dns": (
        RB_NETWORK,
        "Check DNS resolution: the resolver, search domains and service names (Network Issues)",
        None,
    ),
    "connect": (
        RB_NETWORK,
        "Check that the reverse proxy / backend is up and accepting connections and the network path to it"
        " (Network Issues); restart it if it is down",
        FLOW_RESTART,
    ),
    "tls": (
        RB_SLOW,
        "Check the TLS endpoint: the reverse proxy's CPU and TLS session reuse, and the certificate it"
        " serves (renew-certificates checks it)",
        None,
    ),
    "first_byte": (
        RB_SLOW,
        "Identify the bottleneck (database, Redis, application): see the long-queries, top-statements and"
        " services findings; optimize slow queries; scale horizontally if needed; enable caching",
        None,
    ),
    "transfer": (
        RB_SLOW,
        "The response body takes the time: large responses or a slow link; paginate or compress responses",
        None,
    ),
}


def response_time_findings(evidence: ResponseTimesEvidence, slow_ms: float) -> list[Finding]:
    """Unanswered endpoints, endpoints slower than ``slow_ms`` (median; worst only: intermittent)."""
    check = "response-times"
    if not evidence.endpoints:
        return [
            Finding(
                check,
                Severity.INFO,
                "no HTTP endpoint configured (health.urls, runtime.smoke_urls): response times not measured",
                RB_SLOW,
                "Set health.urls (and runtime.smoke_urls) to the app's endpoints",
                None,
            )
        ]
    findings: list[Finding] = []
    for e in evidence.endpoints:
        if e.failed:
            first = e.failed[0]
            phase = first.failed_phase or "connect"
            runbook, resolution, flow = _RESOLUTIONS[phase]
            findings.append(
                Finding(
                    check,
                    Severity.WARNING,
                    f"{e.url}: {len(e.failed)} of {len(e.samples)} requests failed in the"
                    f" {PHASE_NAMES[phase]} phase: {first.error}",
                    runbook,
                    resolution,
                    flow,
                )
            )
        median, worst = e.median("total"), e.worst("total")
        if median is None or worst is None or worst <= slow_ms:
            continue
        dominant = e.dominant or "first_byte"
        share = (e.median(dominant) or 0.0) / median if median else 0.0
        runbook, resolution, flow = _RESOLUTIONS[dominant]
        where = f"the {PHASE_NAMES[dominant]} dominates ({e.median(dominant):g} ms, {share:.0%})"
        if median > slow_ms:
            findings.append(
                Finding(
                    check,
                    Severity.WARNING,
                    f"{e.url} is slow: median {median:g} ms over {slow_ms:g} ms (worst {worst:g} ms, "
                    f"{len(e.answered)} requests); {where}",
                    runbook,
                    resolution,
                    flow,
                )
            )
        else:
            findings.append(
                Finding(
                    check,
                    Severity.INFO,
                    f"{e.url} is sometimes slow: worst {worst:g} ms over {slow_ms:g} ms, median {median:g} ms"
                    f" ({len(e.answered)} requests); {where}",
                    runbook,
                    resolution,
                    flow,
                )
            )
    if not findings:
        findings.append(
            Finding(
                check,
                Severity.OK,
                "; ".join(f"{e.url} median {e.median('total'):g} ms" for e in evidence.endpoints),
                RB_SLOW,
            )
        )
    return findings
