"""TLS certificates: read them from disk and from the wire, decide renewal, run certbot, reload the server.

Plain typed functions; the ``renew-certificates`` flow wraps them. The evidence that a renewal worked is
the certificate the server actually serves, read by a TLS handshake validated like a browser would
(chain against a CA bundle, hostname by SNI), never certbot's exit code alone: a renewed file that nginx
was not told to reload keeps the old certificate in memory until it expires.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tasks.commands import CommandResult, run_command
from tasks.errors import CheckFailed, CommandError, OpsError
from tasks.runlog import run_logger
from tasks.settings import CertEndpoint, CertificatesSettings, OpsSettings

# How often the served certificate is read again while waiting for a reload to take effect.
_STABLE_HANDSHAKES = 3
_POLL_SECONDS = 0.25
# certbot's own output is long; reports keep its tail.
_OUTPUT_TAIL = 1500


class CertificateFileError(OpsError):
    """A configured certificate file or certbot lineage is missing, unreadable or not a certificate."""


class EndpointUnreachable(CheckFailed):
    """No TLS handshake with an endpoint: nothing listens, the name does not resolve, or it timed out."""


class ServedCertificateInvalid(CheckFailed):
    """The endpoint answered, but its certificate does not validate (expired, untrusted, wrong name).

    ``certificate`` holds the leaf it served (read without validation) so the report can show it.
    """

    def __init__(self, message: str, certificate: CertificateInfo | None = None) -> None:
        super().__init__(message)
        self.certificate = certificate


class RenewalFailed(OpsError):
    """certbot could not renew a lineage (or its dry run failed); the certificate on disk is unchanged."""


class ReloadFailed(OpsError):
    """The server could not be told to reload its certificates."""


# --- reading certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateInfo:
    """The facts of one X.509 certificate that renewal decisions and reports need."""

    subject: str
    sans: tuple[str, ...]
    issuer: str
    serial: str
    not_before: datetime
    not_after: datetime
    sha256: str

    def days_left(self, now: datetime | None = None) -> float:
        """Days until ``not_after`` (negative once expired)."""
        return (self.not_after - (now or datetime.now(UTC))) / timedelta(days=1)

    def covers(self, name: str) -> bool:
        """Whether the certificate is valid for ``name`` (SAN DNS names with one-label wildcards, IPs)."""
        wanted = name.lower().rstrip(".")
        for san in self.sans:
            pattern = san.lower()
            if pattern == wanted:
                return True
            if pattern.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == pattern[2:]:
                return True
        return False


def certificate_info(cert: x509.Certificate) -> CertificateInfo:
    """The :class:`CertificateInfo` of a parsed certificate."""
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(san_ext.get_values_for_type(x509.DNSName)) + tuple(
            str(ip) for ip in san_ext.get_values_for_type(x509.IPAddress)
        )
    except x509.ExtensionNotFound:
        sans = ()
    return CertificateInfo(
        subject=cert.subject.rfc4514_string() or _common_name(cert.subject) or "(empty subject)",
        sans=sans,
        issuer=_common_name(cert.issuer) or cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def _common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def read_certificate(path: str | os.PathLike[str]) -> CertificateInfo:
    """Read the first certificate of a PEM file (the leaf of a fullchain file).

    Raises:
        CertificateFileError: the file is missing, unreadable or holds no PEM certificate.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertificateFileError(
            f"certificate file {path} does not exist; fix the path in the certificates settings"
        ) from None
    except (IsADirectoryError, PermissionError) as exc:
        raise CertificateFileError(
            f"cannot read certificate file {path}: {exc.strerror}; check the path and permissions"
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateFileError(
            f"{path} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----'); is it a key file?"
        ) from None
    return certificate_info(certs[0])


@dataclass(frozen=True)
class WatchedCertificate:
    """A certificate this tool watches: a certbot lineage (renewable) or a plain PEM file."""

    name: str
    kind: Literal["lineage", "pem"]
    path: Path
    info: CertificateInfo

    @property
    def renewable(self) -> bool:
        return self.kind == "lineage"


def lineage_names(cfg: CertificatesSettings) -> list[str]:
    """The lineages to watch: the configured names, or every lineage certbot has under ``config_dir``."""
    if cfg.lineages is not None:
        return list(cfg.lineages)
    renewal_dir = cfg.config_dir / "renewal"
    if not renewal_dir.is_dir():
        return []
    return sorted(p.name.removesuffix(".conf") for p in renewal_dir.glob("*.conf"))


def read_lineage(config_dir: Path, name: str) -> WatchedCertificate:
    """Read a certbot lineage's current certificate (``live/NAME/cert.pem``).

    Raises:
        CertificateFileError: certbot has no such lineage in ``config_dir``, or its files are broken.
    """
    conf = config_dir / "renewal" / f"{name}.conf"
    if not conf.is_file():
        known = sorted(p.name.removesuffix(".conf") for p in (config_dir / "renewal").glob("*.conf"))
        raise CertificateFileError(
            f"certbot has no lineage {name!r} in {config_dir} (no {conf}); known lineages:"
            f" {', '.join(known) or 'none'}. Fix certificates.lineages or certificates.config_dir"
        )
    path = config_dir / "live" / name / "cert.pem"
    return WatchedCertificate(name=name, kind="lineage", path=path, info=read_certificate(path))


def read_watched(cfg: CertificatesSettings) -> list[WatchedCertificate]:
    """Every configured certificate, read from disk. Raises before any side effect on a bad path.

    Raises:
        CertificateFileError: a lineage or PEM path is missing or broken, or nothing is configured.
    """
    watched = [read_lineage(cfg.config_dir, name) for name in lineage_names(cfg)]
    watched += [
        WatchedCertificate(name=str(p), kind="pem", path=p, info=read_certificate(p)) for p in cfg.pem_paths
    ]
    if not watched and not cfg.endpoints:
        raise CertificateFileError(
            f"no certificate to watch: no certbot lineage in {cfg.config_dir}, no pem_paths and no"
            " endpoints; set OPS_CERTIFICATES__CONFIG_DIR, __LINEAGES, __PEM_PATHS or __ENDPOINTS"
        )
    return watched


# --- the certificate actually served --------------------------------------------------------------


def _tls_context(ca_bundle: Path | None, verify: bool) -> ssl.SSLContext:
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_bundle is not None and not ca_bundle.is_file():
        raise CertificateFileError(
            f"CA bundle {ca_bundle} does not exist; fix certificates.ca_bundle (the CA that signs the"
            " served certificates)"
        )
    return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)


def _handshake(host: str, port: int, server_name: str, context: ssl.SSLContext, timeout: float) -> bytes:
    where = f"{host}:{port}"
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError:
        raise
    except ConnectionRefusedError:
        raise EndpointUnreachable(
            f"nothing listens on {where} (connection refused); is the TLS server (nginx) running?"
        ) from None
    except socket.gaierror as exc:
        raise EndpointUnreachable(f"cannot resolve {host!r}: {exc.strerror}; fix the endpoint host") from None
    except TimeoutError:
        raise EndpointUnreachable(
            f"no TLS handshake with {where} within {timeout:g}s; is a firewall dropping it, or is the"
            " server hung?"
        ) from None
    except ssl.SSLError as exc:
        raise EndpointUnreachable(
            f"TLS handshake with {where} (SNI {server_name}) failed: {exc.reason or exc}; does it serve TLS"
            " on this port, with a certificate for this name?"
        ) from None
    except OSError as exc:
        raise EndpointUnreachable(f"cannot connect to {where}: {exc.strerror or exc}") from None
    if not der:
        raise EndpointUnreachable(f"{where} completed a handshake without a certificate")
    return der


def fetch_served_certificate(
    host: str,
    port: int,
    server_name: str,
    *,
    ca_bundle: Path | None,
    timeout: float,
) -> CertificateInfo:
    """The leaf certificate ``host:port`` serves for SNI ``server_name``, validated like a client would.

    The chain must lead to a CA in ``ca_bundle`` (the system trust store when None) and the
    certificate must be valid now and for ``server_name``.

    Raises:
        EndpointUnreachable: no connection or no TLS handshake.
        ServedCertificateInvalid: the certificate does not validate; ``.certificate`` holds what was
            served.
        CertificateFileError: ``ca_bundle`` does not exist.
    """
    context = _tls_context(ca_bundle, verify=True)
    try:
        der = _handshake(host, port, server_name, context, timeout)
    except ssl.SSLCertVerificationError as exc:
        # Read what is served anyway, so the report can say which certificate is wrong and why.
        try:
            served = certificate_info(
                x509.load_der_x509_certificate(
                    _handshake(host, port, server_name, _tls_context(None, verify=False), timeout)
                )
            )
        except (EndpointUnreachable, ssl.SSLError, ValueError):
            served = None
        trust = str(ca_bundle) if ca_bundle else "the system trust store"
        detail = f"serial {served.serial}, not after {served.not_after:%Y-%m-%d %H:%M} UTC" if served else ""
        raise ServedCertificateInvalid(
            f"{server_name} at {host}:{port} serves a certificate that does not validate against {trust}:"
            f" {exc.verify_message or exc.reason}" + (f" ({detail})" if detail else ""),
            certificate=served,
        ) from None
    return certificate_info(x509.load_der_x509_certificate(der))


@dataclass(frozen=True)
class ServedCertificate:
    """What one endpoint serves (or why it could not be read)."""

    endpoint: str
    host: str
    port: int
    server_name: str
    info: CertificateInfo | None
    valid: bool
    error: str | None = None


def probe_endpoint(endpoint: CertEndpoint, cfg: CertificatesSettings) -> ServedCertificate:
    """Read an endpoint's served certificate; a failure is recorded, not raised (inventory goes on)."""

    def served(info: CertificateInfo | None, error: str | None = None) -> ServedCertificate:
        return ServedCertificate(
            endpoint=endpoint.label,
            host=endpoint.host,
            port=endpoint.port,
            server_name=endpoint.sni,
            info=info,
            valid=error is None,
            error=error,
        )

    try:
        info = fetch_served_certificate(
            endpoint.host,
            endpoint.port,
            endpoint.sni,
            ca_bundle=cfg.ca_bundle,
            timeout=cfg.handshake_timeout_seconds,
        )
    except ServedCertificateInvalid as exc:
        return served(exc.certificate, str(exc))
    except EndpointUnreachable as exc:
        return served(None, str(exc))
    return served(info)


def expected_certificate(
    endpoint: CertEndpoint, watched: Sequence[WatchedCertificate]
) -> WatchedCertificate | None:
    """The watched certificate an endpoint should serve: the one it names, else one covering its name.

    Raises:
        CertificateFileError: the endpoint names a certificate that is not watched.
    """
    if endpoint.certificate is not None:
        for cert in watched:
            if endpoint.certificate in {cert.name, str(cert.path)}:
                return cert
        raise CertificateFileError(
            f"endpoint {endpoint.label} names certificate {endpoint.certificate!r}, which is not watched;"
            f" watched: {', '.join(c.name for c in watched) or 'none'}"
        )
    covering = [c for c in watched if c.info.covers(endpoint.sni)]
    # Of several candidates, the one that lives longest is the one a correct server serves.
    return max(covering, key=lambda c: c.info.not_after, default=None)


# --- inventory and decision -----------------------------------------------------------------------

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
        if state.stale:
            found.append(
                Finding(
                    "not-reloaded",
                    served.endpoint,
                    f"renewed but not reloaded: serves serial {served.info.serial} (not after"
                    f" {served.info.not_after:%Y-%m-%d %H:%M} UTC) while {expected.path} holds serial"
                    f" {expected.info.serial} (not after {expected.info.not_after:%Y-%m-%d %H:%M} UTC);"
                    " the server must reload its certificates",
                )
            )
        else:
            found.append(
                Finding(
                    "unexpected-certificate",
                    served.endpoint,
                    f"serves serial {served.info.serial}, not {expected.name} (serial"
                    f" {expected.info.serial}); check the server's ssl_certificate path",
                )
            )
    return found


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
        if should_renew(cert.info.not_after, now, cfg.renew_threshold_days, force=False):
            left = cert.info.days_left(now)
            if cert.renewable:
                text = f"{left:.1f} days left (threshold {cfg.renew_threshold_days}); due for renewal"
                findings.append(Finding("due", cert.name, text))
            else:
                text = (
                    f"{left:.1f} days left (threshold {cfg.renew_threshold_days}) and not a certbot lineage:"
                    " renew it by hand or manage it with certbot"
                )
                findings.append(Finding("not-renewable", cert.name, text))
    for state in states:
        findings.extend(endpoint_findings(state, cfg.renew_threshold_days, now))
    return Inventory(taken_at=now, certificates=tuple(watched), endpoints=states, findings=tuple(findings))


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


# --- certbot ---------------------------------------------------------------------------------------


def certbot_program(cfg: CertificatesSettings) -> str:
    """The certbot to run: the configured path, else the one installed beside this Python, else PATH."""
    if cfg.certbot_path is not None:
        return str(cfg.certbot_path)
    beside = Path(sys.executable).parent / "certbot"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("certbot") or "certbot"


def certbot_renew_argv(cfg: CertificatesSettings, cert_name: str, *, dry_run: bool) -> list[str]:
    """``certbot renew`` for one lineage, with everything a non-interactive run needs.

    ``--server`` is repeated because a dry run ignores the server stored in the lineage; without
    ``--no-random-sleep-on-renew`` a non-interactive renew sleeps for up to eight minutes. A real renew
    passes ``--force-renewal``: the decision was made by the threshold here, and certbot's own
    (``renew_before_expiry``) would otherwise skip the lineage silently.
    """
    argv = [
        certbot_program(cfg),
        "renew",
        "--cert-name",
        cert_name,
        "--non-interactive",
        "--no-random-sleep-on-renew",
        "--server",
        cfg.acme_server,
        "--config-dir",
        str(cfg.config_dir),
        "--work-dir",
        str(cfg.work_dir),
        "--logs-dir",
        str(cfg.logs_dir),
    ]
    argv.append("--dry-run" if dry_run else "--force-renewal")
    return argv


def certbot_env(cfg: CertificatesSettings) -> dict[str, str]:
    """Environment for certbot: the CA bundle it trusts for the ACME server, when configured."""
    return {"REQUESTS_CA_BUNDLE": str(cfg.acme_ca_bundle)} if cfg.acme_ca_bundle else {}


def _tail(result: CommandResult) -> str:
    return (result.stderr or result.stdout)[-_OUTPUT_TAIL:]


def certbot_reason(output: str) -> str:
    """The line of certbot's output that says why it failed (its output is mostly decoration)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("Failed to renew", "Error", "error", "failed", "Failed"):
        for line in lines:
            if marker in line and not line.startswith("Ask for help"):
                return line
    return lines[-1] if lines else "(no output)"


@dataclass(frozen=True)
class DryRunResult:
    """A ``certbot renew --dry-run`` of one lineage: whether a real renewal would succeed."""

    cert_name: str
    passed: bool
    command: str
    output_tail: str
    duration_seconds: float


def certbot_dry_run(cfg: CertificatesSettings, cert_name: str) -> DryRunResult:
    """Run ``certbot renew --dry-run`` for one lineage against the ACME server; never raises for a failure.

    Raises:
        CommandError: certbot itself is missing or timed out.
    """
    argv = certbot_renew_argv(cfg, cert_name, dry_run=True)
    _require_program(argv[0])
    result = run_command(argv, env=certbot_env(cfg), timeout=cfg.certbot_timeout_seconds, check=False)
    return DryRunResult(cert_name, result.ok, result.command_line, _tail(result), result.duration_seconds)


@dataclass(frozen=True)
class RenewalRecord:
    """What renewing one lineage changed (the change record)."""

    cert_name: str
    changed: bool
    old_serial: str
    new_serial: str
    old_not_after: datetime
    new_not_after: datetime
    command: str


def renew_lineage(cfg: CertificatesSettings, cert_name: str) -> RenewalRecord:
    """Renew one lineage with ``certbot renew --cert-name NAME`` and read the new certificate.

    Raises:
        RenewalFailed: certbot failed, or the certificate on disk did not change.
        CertificateFileError: the lineage does not exist.
    """
    before = read_lineage(cfg.config_dir, cert_name)
    argv = certbot_renew_argv(cfg, cert_name, dry_run=False)
    _require_program(argv[0])
    try:
        result = run_command(argv, env=certbot_env(cfg), timeout=cfg.certbot_timeout_seconds)
    except CommandError as exc:
        raise RenewalFailed(
            f"certbot could not renew {cert_name}; the certificate on disk is unchanged (serial"
            f" {before.info.serial}). Look at {cfg.logs_dir}/letsencrypt.log. certbot said:\n"
            f"{str(exc)[-_OUTPUT_TAIL:]}"
        ) from None
    after = read_lineage(cfg.config_dir, cert_name)
    if after.info.serial == before.info.serial:
        raise RenewalFailed(
            f"certbot exited 0 but {after.path} still holds serial {before.info.serial}; certbot said:\n"
            f"{_tail(result)}"
        )
    run_logger(__name__).info(
        "renewed %s: serial %s -> %s, not after %s",
        cert_name,
        before.info.serial,
        after.info.serial,
        after.info.not_after.isoformat(),
    )
    return RenewalRecord(
        cert_name=cert_name,
        changed=True,
        old_serial=before.info.serial,
        new_serial=after.info.serial,
        old_not_after=before.info.not_after,
        new_not_after=after.info.not_after,
        command=result.command_line,
    )


def _require_program(program: str) -> None:
    if shutil.which(program) is None:
        raise CommandError(
            f"certbot not found at {program!r}; install certbot or set OPS_CERTIFICATES__CERTBOT_PATH"
        )


# --- reload ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadRecord:
    """How the server was told to reload, and the commands run (the change record)."""

    method: str
    changed: bool
    commands: tuple[str, ...] = ()


def reload_commands(settings: OpsSettings) -> list[list[str]]:
    """The reload argvs for the ``nginx`` and ``compose`` methods (none for the others).

    Compose's default addresses the project the way the Compose runtime does (project name, files,
    env file, project directory from ``runtime.compose``), so ``exec`` finds the running container.
    """
    cfg = settings.certificates
    if cfg.reload_method == "nginx":
        return [list(cfg.reload_argv or ["nginx", "-s", "reload"])]
    if cfg.reload_method == "compose":
        if cfg.reload_argv:
            return [list(cfg.reload_argv)]
        compose = settings.runtime.compose
        base = [*compose.command, "--project-name", compose.project or settings.stack]
        for path in compose.files:
            base += ["--file", os.fspath(path)]
        if compose.env_file is not None:
            base += ["--env-file", os.fspath(compose.env_file)]
        if compose.project_directory is not None:
            base += ["--project-directory", os.fspath(compose.project_directory)]
        return [[*base, "exec", "-T", service, "nginx", "-s", "reload"] for service in cfg.reload_services]
    return []


def reload_env(settings: OpsSettings) -> dict[str, str]:
    """Environment for the reload command: the Compose runtime's Docker Engine, when configured."""
    if settings.certificates.reload_method != "compose":
        return {}
    compose = settings.runtime.compose
    env = {}
    if compose.docker_host:
        env["DOCKER_HOST"] = compose.docker_host
    if compose.docker_config:
        env["DOCKER_CONFIG"] = os.fspath(compose.docker_config)
    return env


def reload_server(settings: OpsSettings) -> ReloadRecord:
    """Make the TLS server load the renewed certificates, the way the settings name.

    ``nginx``: a local ``nginx -s reload``; ``compose``: ``docker compose exec nginx nginx -s reload``;
    ``kubernetes``: a rollout restart of the nginx Deployments through the runtime; ``none``: nothing
    (something else reloads; verification still checks what is served).

    Raises:
        ReloadFailed: the reload command or the restart failed.
    """
    cfg = settings.certificates
    if cfg.reload_method == "none":
        return ReloadRecord(method="none", changed=False)
    if cfg.reload_method == "kubernetes":
        # The runtime pulls in the Kubernetes client: imported only when this method is used.
        from tasks.runtime import get_runtime

        try:
            runtime = get_runtime(settings)
            records = runtime.restart(list(cfg.reload_services))
            runtime.wait_ready(list(cfg.reload_services), timeout=cfg.reload_timeout_seconds)
        except OpsError as exc:
            raise ReloadFailed(
                f"rollout restart of {', '.join(cfg.reload_services)} failed: {exc}; the new certificate"
                " is on disk but not served yet"
            ) from None
        commands = tuple(c for r in records for c in r.commands) or tuple(
            f"rollout restart {r.target}" for r in records
        )
        return ReloadRecord(method="kubernetes", changed=True, commands=commands)
    ran = []
    for argv in reload_commands(settings):
        try:
            result = run_command(argv, env=reload_env(settings), timeout=cfg.reload_timeout_seconds)
        except CommandError as exc:
            raise ReloadFailed(
                f"reload with {' '.join(argv)} failed: {exc}; the new certificate is on disk but not"
                " served yet. Fix the server (nginx -t) and reload it"
            ) from None
        ran.append(result.command_line)
    return ReloadRecord(method=cfg.reload_method, changed=True, commands=tuple(ran))


# --- verification -----------------------------------------------------------------------------------


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
    """Whether an endpoint serves the certificate on disk, validly, with at least ``min_days`` left."""
    info = served.info
    expected_serial = expected.info.serial if expected else None
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
                f" {min_days:g} wanted after renewal); is the CA issuing shorter certificates than"
                " renew_threshold_days?"
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
    (default: the renew threshold); an endpoint no watched certificate covers must have more than the
    threshold left, since nothing here would renew it. After a reload the server may take a moment
    to switch: endpoints are read again until they pass or ``wait_seconds`` have passed.

    Raises:
        CertificateFileError: a configured path or lineage is bad.
    """
    renewed = set(renewed)
    watched = read_watched(cfg)
    min_after = (
        cfg.min_days_after_renewal if cfg.min_days_after_renewal is not None else cfg.renew_threshold_days
    )
    deadline = time.monotonic() + wait_seconds
    verdicts = []
    for endpoint in cfg.endpoints:
        expected = expected_certificate(endpoint, watched)
        if expected is None:
            min_days: float | None = cfg.renew_threshold_days
        else:
            min_days = min_after if expected.name in renewed else None
        # After a reload, old nginx workers may still answer a handshake or two while they drain: a
        # switch counts once several handshakes in a row show it.
        needed = _STABLE_HANDSHAKES if wait_seconds > 0 else 1
        in_a_row = 0
        while True:
            verdict = judge_endpoint(probe_endpoint(endpoint, cfg), expected, min_days)
            in_a_row = in_a_row + 1 if verdict.ok else 0
            if in_a_row >= needed or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_SECONDS)
        verdicts.append(verdict)
    return verdicts


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
    error: str | None = None

    def unrenewed_due(self) -> list[str]:
        """Due certificates that this run could not renew (failed dry run or renew, or not renewable)."""
        if self.plan is None:
            return []
        failed_dry = [d.cert_name for d in self.dry_runs if not d.passed]
        return sorted({*failed_dry, *self.renewal_errors, *self.plan.not_renewable})

    def problems(self) -> list[str]:
        """What makes the run fail, one line each."""
        out = []
        out += [
            f"dry run of {d.cert_name} failed, so it was not renewed: {certbot_reason(d.output_tail)}"
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
        if self.error:
            out.append(self.error)
        return out
