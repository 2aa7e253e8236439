"""Certificates on disk: certbot lineages and plain PEM files, read into :class:`CertificateInfo`.

Reading everything that is configured happens before any side effect, so a bad path or an unknown
lineage fails the run at once and names the setting to fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tasks.errors import OpsError
from tasks.settings import CertificatesSettings


class CertificateFileError(OpsError):
    """A configured certificate file or certbot lineage is missing, unreadable or not a certificate."""


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

    @property
    def lifetime_days(self) -> float:
        """How long the certificate is valid in all, as issued by its CA, days.

        Both bounds are included (RFC 5280, 4.1.2.5): a 90-day certificate says
        ``not_after = not_before + 90 days - 1 second``.
        """
        return (self.not_after - self.not_before + timedelta(seconds=1)) / timedelta(days=1)

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


def renewal_server(config_dir: Path, name: str) -> str | None:
    """The ACME server a lineage's renewal configuration names (``server`` in ``[renewalparams]`` of
    ``config_dir/renewal/NAME.conf``), or None when it names none (certbot then used its default).

    The file is certbot's configobj format: top-level keys, then ``[renewalparams]`` and nested
    ``[[...]]`` sections; only that one key is read.
    """
    conf = config_dir / "renewal" / f"{name}.conf"
    try:
        lines = conf.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, IsADirectoryError):
        return None
    section = ""
    for raw in lines:
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[renewalparams]" and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            if key == "server" and value:
                return value.strip("\"'")
    return None


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
