"""HTTP probes of the application's own endpoints."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from tasks.secrets import mask_url


@dataclass(frozen=True)
class HttpProbe:
    """One GET: status code, latency, and the body parsed as JSON when it is JSON."""

    url: str
    status_code: int
    latency_ms: float
    body: Any | None


def probe_http(url: str, *, timeout: float, verify: bool | str = True) -> HttpProbe:
    """GET ``url`` with a total timeout; the URL in the result has its password masked.

    Raises:
        httpx.HTTPError: connection refused, timeout, TLS failure.
    """
    started = time.perf_counter()
    with httpx.Client(timeout=httpx.Timeout(timeout), verify=verify, follow_redirects=False) as http:
        response = http.get(url, headers={"Accept": "application/json", "User-Agent": "swagger2mcp-ops"})
    latency_ms = (time.perf_counter() - started) * 1000
    body: Any | None = None
    if "json" in response.headers.get("content-type", ""):
        try:
            body = response.json()
        except json.JSONDecodeError:
            body = None
    return HttpProbe(
        url=mask_url(url), status_code=response.status_code, latency_ms=round(latency_ms, 2), body=body
    )
