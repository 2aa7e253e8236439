"""The notifications section: its channels and SMTP."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from tasks.settings.base import _Section


class ChannelSettings(_Section):
    """One notification channel: where a message goes and which audiences it serves."""

    kind: Literal["slack", "email", "pagerduty", "webhook"] = Field(
        description="`slack` (incoming webhook), `email` (SMTP), `pagerduty` (Events API v2) or `webhook`"
    )
    audiences: list[str] = Field(
        min_length=1,
        description="audiences (named in routes) this channel serves, e.g. on-call, devops, chat (JSON list)",
    )
    url: SecretStr | None = Field(
        default=None,
        description="slack/webhook: the URL posted to; pagerduty: Events API endpoint override (secret)",
    )
    routing_key: SecretStr | None = Field(
        default=None, description="pagerduty: the service's Events API v2 integration key (secret)"
    )
    to: list[str] = Field(default_factory=list, description="email: the recipients (JSON list)")
    authorization: SecretStr | None = Field(
        default=None, description="webhook: Authorization header value, e.g. 'GenieKey ...' (secret)"
    )

    @model_validator(mode="after")
    def _complete(self) -> ChannelSettings:
        for audience in self.audiences:
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", audience):
                raise ValueError(f"audience {audience!r} must be lowercase letters, digits and dashes")
        if self.kind in {"slack", "webhook"} and self.url is None:
            raise ValueError(f"a {self.kind} channel needs url (https://hooks.example.com/...)")
        if self.url is not None and urlsplit(self.url.get_secret_value()).scheme not in {"http", "https"}:
            raise ValueError("url must be an http(s) URL")
        if self.kind == "pagerduty" and self.routing_key is None:
            raise ValueError("a pagerduty channel needs routing_key (the Events API v2 integration key)")
        if self.kind == "email" and not self.to:
            raise ValueError('an email channel needs to (a JSON list of recipients, ["ops@example.com"])')
        for address in self.to:
            if "@" not in address or any(c in address for c in " ,;<>\r\n"):
                raise ValueError(f"{address!r} is not one e-mail address")
        return self


class SmtpSettings(_Section):
    """The SMTP server e-mail channels send through."""

    host: str | None = Field(
        default=None, description="SMTP server host; None: e-mail channels fail to deliver, saying so"
    )
    port: int = Field(default=587, ge=1, le=65535, description="SMTP server port (587: submission)")
    starttls: bool = Field(default=True, description="upgrade the connection with STARTTLS before auth")
    username: str | None = Field(default=None, description="SMTP auth user; None: no authentication")
    password: SecretStr | None = Field(default=None, description="SMTP auth password (secret)")
    sender: str = Field(default="swagger2mcp-ops@localhost", description="the From address of every message")
    verify_tls: bool = Field(default=True, description="verify the server's certificate on STARTTLS")


class NotificationsSettings(_Section):
    """Escalation: the channels routes deliver to, and how delivery and health paging behave."""

    channels: dict[str, ChannelSettings] = Field(
        default_factory=dict,
        description="named channels (JSON map name -> {kind, audiences, url/routing_key/to}); secrets inside",
        examples=[
            {
                "chat": {
                    "kind": "slack",
                    "audiences": ["chat", "on-call"],
                    "url": "https://hooks.example.com/T0",
                },
                "pager": {"kind": "pagerduty", "audiences": ["on-call"], "routing_key": "R0UTINGKEY"},
            }
        ],
    )
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    ui_url: str = Field(
        default="http://127.0.0.1:4200",
        description="the Prefect UI's base URL, for the run links in messages",
        examples=["https://prefect.example.com"],
    )
    pagerduty_url: str = Field(
        default="https://events.pagerduty.com/v2/enqueue", description="PagerDuty Events API v2 endpoint"
    )
    consecutive_unhealthy: int = Field(
        default=2, ge=1, le=100, description="consecutive unhealthy health checks before on-call is paged"
    )
    attempts: int = Field(default=4, ge=1, le=20, description="delivery attempts per channel and message")
    backoff_seconds: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="wait before the 2nd attempt, doubled before each next, seconds",
    )
    timeout_seconds: float = Field(
        default=10.0, gt=0, description="time limit of one delivery attempt, seconds"
    )
    state_prefix: str = Field(
        default="notifications", description="storage prefix of the paging state (open incidents, counts)"
    )

    @field_validator("channels")
    @classmethod
    def _channel_names(cls, value: dict[str, ChannelSettings]) -> dict[str, ChannelSettings]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"channel name {name!r} must be letters, digits, '-' or '_'")
        return value

    @field_validator("ui_url", "pagerduty_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"http", "https"}:
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("state_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or ".." in value.split("/") or "\\" in value:
            raise ValueError("must be a relative storage prefix such as 'notifications'")
        return value.strip("/")
