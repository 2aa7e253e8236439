"""The health and diagnose sections."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from tasks.settings.base import _Section


class HealthSettings(_Section):
    """The health check: endpoints, timeouts and the thresholds that make a check degraded."""

    urls: list[str] = Field(
        default_factory=list,
        description="the app's own HTTP health endpoints (JSON list of http(s) URLs)",
        examples=[["http://127.0.0.1:3000/health"]],
    )
    timeout_seconds: float = Field(
        default=5.0, gt=0, le=120, description="HTTP probe timeout, seconds; each check's deadline is 2x + 1"
    )
    postgres_latency_warn_ms: float = Field(
        default=250.0, gt=0, description="PostgreSQL SELECT 1 latency above which it is degraded, ms"
    )
    redis_latency_warn_ms: float = Field(
        default=100.0, gt=0, description="Redis PING latency above which it is degraded, ms"
    )
    http_latency_warn_ms: float = Field(
        default=1000.0, gt=0, description="HTTP endpoint latency above which it is degraded, ms"
    )
    connections_warn_ratio: float = Field(
        default=0.8, gt=0, le=1, description="share of max_connections in use at which PostgreSQL is degraded"
    )
    redis_memory_warn_ratio: float = Field(
        default=0.9, gt=0, le=1, description="share of maxmemory used at which Redis is degraded"
    )
    failed_jobs_warn: int = Field(
        default=100, ge=0, description="failed jobs (all queues) above which the queue check is degraded"
    )
    waiting_jobs_warn: int = Field(
        default=1000, ge=0, description="waiting jobs (all queues) above which the queue check is degraded"
    )

    @field_validator("urls")
    @classmethod
    def _valid_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if urlsplit(url).scheme not in {"http", "https"}:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value


class DiagnoseSettings(_Section):
    """The diagnose flow: thresholds that make a finding a warning or critical, and what else to look at."""

    long_query_seconds: float = Field(
        default=5.0, gt=0, description="queries running longer are reported, seconds"
    )
    slow_statement_mean_ms: float = Field(
        default=1000.0,
        gt=0,
        description="pg_stat_statements entries with a higher mean time are findings, ms",
    )
    top_statements: int = Field(
        default=10, ge=1, le=100, description="pg_stat_statements entries shown, slowest mean time first"
    )
    connections_warn_ratio: float = Field(
        default=0.8, gt=0, le=1, description="share of max_connections in use that is a warning"
    )
    connections_critical_ratio: float = Field(
        default=0.95, gt=0, le=1, description="share of max_connections in use that is critical"
    )
    idle_in_transaction_warn_seconds: float = Field(
        default=60.0, gt=0, description="sessions idle in transaction this long are a warning, seconds"
    )
    redis_memory_warn_ratio: float = Field(
        default=0.8, gt=0, le=1, description="share of Redis maxmemory used that is a warning"
    )
    redis_memory_critical_ratio: float = Field(
        default=0.95, gt=0, le=1, description="share of Redis maxmemory used that is critical"
    )
    redis_fragmentation_warn: float = Field(
        default=1.5, gt=1, description="Redis memory fragmentation ratio that is a warning (above 10 MB used)"
    )
    failed_jobs_shown: int = Field(
        default=10, ge=0, le=1000, description="newest failed jobs shown per queue, with their reasons"
    )
    waiting_jobs_warn: int = Field(
        default=1000, ge=0, description="waiting jobs in one queue above which it is a warning"
    )
    log_tail_lines: int = Field(
        default=100, ge=0, le=10000, description="log lines read per service; 0: no logs"
    )
    log_patterns: list[str] = Field(
        default_factory=lambda: [
            r"(?i)\berror\b",
            r"(?i)out of memory|heap|\boom\b",
            r"ECONNREFUSED|ETIMEDOUT",
        ],
        description="regular expressions whose matching lines in the log tails are counted and shown",
        examples=[[r"(?i)\berror\b", "ECONNREFUSED|ETIMEDOUT", "Cannot save file"]],
    )
    restarts_warn: int = Field(
        default=3, ge=1, description="container restarts of a service that are a warning"
    )
    cpu_warn_percent: float = Field(
        default=90.0, gt=0, description="CPU use of a service that is a warning, percent of one core"
    )
    disk_paths: list[Path] = Field(
        default_factory=list,
        description="more paths whose filesystems are checked (the uploads root and file storage always are)",
        examples=[["/var/lib/docker"]],
    )
    disk_free_warn_ratio: float = Field(
        default=0.15, gt=0, lt=1, description="free share of a filesystem at or below which it is a warning"
    )
    disk_free_critical_ratio: float = Field(
        default=0.05, gt=0, lt=1, description="free share of a filesystem at or below which it is critical"
    )
    resolve_hosts: list[str] = Field(
        default_factory=list,
        description="more host names to resolve (PostgreSQL's, Redis's and the health URLs' always are)",
        examples=[["api.example.com"]],
    )
    network_timeout_seconds: float = Field(
        default=3.0, gt=0, le=60, description="timeout of each TCP connect and DNS lookup, seconds"
    )
    backend_service: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "the service (of runtime.services) inside whose container or pod the TCP and DNS checks run"
            " too, to compare with the ops host's view; None: the first of runtime.services"
        ),
        examples=["backend"],
    )
    check_deadline_seconds: float = Field(
        default=30.0, gt=0, le=600, description="hard deadline of each diagnostic check, seconds"
    )
    http_samples: int = Field(
        default=5,
        ge=1,
        le=50,
        description="requests timed per endpoint (health.urls and runtime.smoke_urls): median and worst",
    )
    http_slow_ms: float = Field(
        default=1000.0,
        gt=0,
        description="response time above which an endpoint is slow (the runbook's 1 second), ms",
    )
    http_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="time limit of each timed request, seconds"
    )
    expected_upload_mb: float = Field(
        default=10.0,
        gt=0,
        description="largest upload the app must accept, MiB: a lower limit on the request path is a finding",
    )
    nginx_config_argv: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "command printing the reverse proxy's loaded configuration, `nginx -T` (JSON list);"
            " None: not read"
        ),
        examples=[["docker", "exec", "proxy", "nginx", "-T"]],
    )
    nginx_config_timeout_seconds: float = Field(
        default=20.0, gt=0, le=300, description="time limit of the nginx configuration command, seconds"
    )
    nginx_server_names: list[str] = Field(
        default_factory=list,
        description="server_name of the app's nginx server blocks (JSON list); empty: every server block",
        examples=[["api.example.com"]],
    )
    ingress_default_body_size: str = Field(
        default="1m",
        pattern=r"^[0-9]+[kKmMgG]?$",
        description=(
            "upload limit of an nginx Ingress without the proxy-body-size annotation: the ingress-nginx"
            " ConfigMap's proxy-body-size (its own default is 1m)"
        ),
    )
    backend_upload_limit_mb: float | None = Field(
        default=None,
        gt=0,
        description="the backend's own upload limit (e.g. Multer's limits.fileSize), MiB; None: not known",
    )

    @field_validator("log_patterns")
    @classmethod
    def _valid_patterns(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> DiagnoseSettings:
        if self.connections_critical_ratio < self.connections_warn_ratio:
            raise ValueError("connections_critical_ratio must not be below connections_warn_ratio")
        if self.redis_memory_critical_ratio < self.redis_memory_warn_ratio:
            raise ValueError("redis_memory_critical_ratio must not be below redis_memory_warn_ratio")
        if self.disk_free_critical_ratio > self.disk_free_warn_ratio:
            raise ValueError("disk_free_critical_ratio must not be above disk_free_warn_ratio")
        return self
