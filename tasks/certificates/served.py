"""The certificate a server actually serves, read by a TLS handshake validated like a browser would
(chain against a CA bundle, hostname by SNI), and which watched certificate it should be.

This is the evidence that a renewal worked: a renewed file that nginx was not told to reload keeps
the old certificate in memory until it expires.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tasks.certificates.files import (
    CertificateFileError,
    CertificateInfo,
    WatchedCertificate,
    certificate_info,
)
from tasks.errors import CheckFailed
from tasks.settings import CertEndpoint, CertificatesSettings


class EndpointUnreachable(CheckFailed):
    """No TLS handshake with an endpoint: nothing listens, the name does not resolve, or it timed out."""


class ServedCertificateInvalid(CheckFailed):
    """The endpoint answered, but its certificate does not validate (expired, untrusted, wrong name).

    ``certificate`` holds the leaf it served (read without validation) so the report can show it.
    """

    def __init__(self, message: str, certificate: CertificateInfo | None = None) -> None:
        super().__init__(message)
        self.certificate = certificate


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
        served = _read_unverified(host, port, server_name, timeout)
        trust = str(ca_bundle) if ca_bundle else "the system trust store"
        detail = f"serial {served.serial}, not after {served.not_after:%Y-%m-%d %H:%M} UTC" if served else ""
        raise ServedCertificateInvalid(
            f"{server_name} at {host}:{port} serves a certificate that does not validate against {trust}:"
            f" {exc.verify_message or exc.reason}" + (f" ({detail})" if detail else ""),
            certificate=served,
        ) from None
    return certificate_info(x509.load_der_x509_certificate(der))


def _read_unverified(host: str, port: int, server_name: str, timeout: float) -> CertificateInfo | None:
    """The leaf ``host:port`` serves, read without validating it; None when even that fails."""
    try:
        der = _handshake(host, port, server_name, _tls_context(None, verify=False), timeout)
        return certificate_info(x509.load_der_x509_certificate(der))
    except (EndpointUnreachable, ssl.SSLError, ValueError):
        return None


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
