"""The certificates section and its endpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from tasks.settings.base import _Section


class CertEndpoint(_Section):
    """One TLS endpoint whose served certificate is checked: where to connect and the SNI name."""

    host: str = Field(min_length=1, description="address or name to connect to")
    port: int = Field(default=443, ge=1, le=65535, description="TCP port of the TLS endpoint")
    server_name: str | None = Field(
        default=None, description="SNI name, also the name the certificate must be valid for; default host"
    )
    certificate: str | None = Field(
        default=None,
        description="certbot lineage or PEM path this endpoint must serve; default: the watched one covering"
        " server_name",
    )

    @property
    def sni(self) -> str:
        return self.server_name or self.host

    @property
    def label(self) -> str:
        return f"{self.sni} at {self.host}:{self.port}"


class CertificatesSettings(_Section):
    """TLS certificates: what to watch, where they are served, how certbot renews them, how to reload."""

    certbot_path: Path | None = Field(
        default=None, description="certbot program; default: the certbot beside this Python, else on PATH"
    )
    config_dir: Path = Field(
        default=Path("/etc/letsencrypt"), description="certbot --config-dir (its live/ and renewal/ lineages)"
    )
    work_dir: Path = Field(default=Path("/var/lib/letsencrypt"), description="certbot --work-dir")
    logs_dir: Path = Field(
        default=Path("/var/log/letsencrypt"), description="certbot --logs-dir (letsencrypt.log)"
    )
    acme_server: str = Field(
        default="https://acme-v02.api.letsencrypt.org/directory",
        description="https:// URL of the ACME directory (certbot --server) for lineages whose renewal"
        " configuration names no server; each other lineage renews against the CA that issued it",
        examples=["https://acme-staging-v02.api.letsencrypt.org/directory"],
    )
    force_acme_server: bool = Field(
        default=False,
        description="renew every lineage against acme_server, whatever server its renewal configuration"
        " names (to move lineages to another CA)",
    )
    acme_ca_bundle: Path | None = Field(
        default=None,
        description="roots that sign the ACME server's own HTTPS, for certbot (REQUESTS_CA_BUNDLE);"
        " default: certbot's trust. Not the roots of served certificates: see ca_bundle",
        examples=["/etc/step-ca/certs/root_ca.crt"],
    )
    lineages: list[str] | None = Field(
        default=None,
        description="certbot certificate names to watch and renew (JSON list); default: all in config_dir",
        examples=[["api.example.com"]],
    )
    pem_paths: list[Path] = Field(
        default_factory=list,
        description="other certificate files to watch (JSON list; certbot does not renew them)",
        examples=[["/etc/nginx/tls/internal.pem"]],
    )
    endpoints: list[CertEndpoint] = Field(
        default_factory=list,
        description="TLS endpoints whose served certificate is checked (JSON list of objects)",
        examples=[[{"host": "127.0.0.1", "port": 443, "server_name": "api.example.com"}]],
    )
    ca_bundle: Path | None = Field(
        default=None,
        description="roots that sign the certificates endpoints serve, to validate them; default: system"
        " trust. Not the ACME server's HTTPS: see acme_ca_bundle",
        examples=["/etc/ssl/letsencrypt-staging-roots.pem"],
    )
    renew_threshold_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="a certificate with fewer days left is renewed, days; at most two thirds of the"
        " certificate's lifetime apply (never renewed in the first third of its life unless forced)",
    )
    min_days_after_renewal: int | None = Field(
        default=None,
        ge=0,
        description="days a renewed, served certificate must have left; default: the threshold that"
        " applies to it, so that it is not due again",
    )
    reload_method: Literal["nginx", "compose", "kubernetes", "none"] = Field(
        default="nginx",
        description="how nginx is reloaded after a renewal: `nginx`, `compose`, `kubernetes` or `none`",
    )
    reload_argv: list[str] | None = Field(
        default=None,
        description="reload command for `nginx` or `compose` (JSON list); default nginx -s reload, or"
        " docker compose exec -T <service> nginx -s reload",
    )
    reload_services: list[str] = Field(
        default_factory=lambda: ["nginx"],
        min_length=1,
        description="Compose services or Kubernetes Deployments that run nginx (JSON list)",
    )
    certbot_timeout_seconds: float = Field(
        default=600.0, gt=0, description="time limit of each certbot run, seconds"
    )
    reload_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="time limit of a reload command or of the restarted nginx becoming ready, seconds",
    )
    handshake_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="timeout of each TLS handshake with an endpoint, seconds"
    )
    verify_timeout_seconds: float = Field(
        default=60.0,
        ge=0,
        description="how long a reloaded server may take to serve the new certificate, seconds",
    )

    @field_validator("acme_server")
    @classmethod
    def _valid_server(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.netloc:
            raise ValueError("must be the https:// URL of an ACME directory")
        return value

    @field_validator("lineages")
    @classmethod
    def _valid_lineages(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"{name!r} is not a certbot certificate name (see `certbot certificates`)")
        return value

    @field_validator("reload_argv")
    @classmethod
    def _valid_argv(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("must name a program and its arguments, e.g. ['nginx', '-s', 'reload']")
        return value
