"""Health checks against real PostgreSQL and Redis: healthy, down, refusing, hanging, and back up."""

from __future__ import annotations

import time

import psycopg
import pytest

from tasks.health import Status, run_checks
from tasks.settings import load_settings
from tests.fixtures.servers import CLOSED_PORT, PostgresCluster, RedisServer, SilentServer


def settings_for(pg_dsn: str, redis_url: str, **health: object):
    return load_settings(
        stack="teststack",
        postgres={"dsn": pg_dsn, "connect_timeout_seconds": 2},
        redis={"url": redis_url, "socket_timeout_seconds": 2},
        health={"timeout_seconds": 2, **health},
    )


def test_healthy_stack(pg_database: tuple[str, str], redis_db: str) -> None:
    report = run_checks(settings_for(pg_database[1], redis_db))
    assert report.status is Status.HEALTHY, report.as_runbook()
    body = report.as_runbook()
    assert set(body) == {"status", "timestamp", "checks"}
    assert body["timestamp"].endswith("Z")
    postgres = body["checks"]["postgres"]
    assert postgres["status"] == "healthy"
    assert postgres["latency"] > 0
    assert postgres["max_connections"] >= postgres["connections"] >= 1
    redis = body["checks"]["redis"]
    assert redis["maxmemory_policy"] == "noeviction"
    queue = body["checks"]["queue"]
    assert queue["active"] == 0
    assert queue["waiting"] == 0


def test_services_down_are_unhealthy_with_masked_errors(redis_db: str) -> None:
    started = time.monotonic()
    report = run_checks(
        settings_for(
            f"postgresql://app:TopSecretPw@127.0.0.1:{CLOSED_PORT}/app",
            f"redis://:OtherSecret@127.0.0.1:{CLOSED_PORT}/0",
        )
    )
    assert time.monotonic() - started < 10
    assert report.status is Status.UNHEALTHY
    for name in ("postgres", "redis", "queue"):
        check = report.checks[name]
        assert check.status is Status.UNHEALTHY
        assert check.error
        assert "TopSecretPw" not in check.error
        assert "OtherSecret" not in check.error
    assert "refused" in report.checks["postgres"].error.lower()
    assert report.failed_checks == ["postgres", "redis", "queue"]


def test_hanging_services_are_unhealthy_within_the_deadline(silent_server: SilentServer) -> None:
    port = silent_server.port
    started = time.monotonic()
    report = run_checks(settings_for(f"postgresql://app@127.0.0.1:{port}/app", f"redis://127.0.0.1:{port}/0"))
    elapsed = time.monotonic() - started
    # Deadline is 2 * timeout + 1 = 5 s per check, all checks at once.
    assert elapsed < 8, elapsed
    assert report.checks["postgres"].status is Status.UNHEALTHY
    assert report.checks["redis"].status is Status.UNHEALTHY
    assert report.checks["queue"].status is Status.UNHEALTHY


def test_redis_stopped_then_started(private_redis: RedisServer, pg_database: tuple[str, str]) -> None:
    settings = settings_for(pg_database[1], private_redis.url)
    assert run_checks(settings).status is Status.HEALTHY
    private_redis.stop()
    down = run_checks(settings)
    assert down.status is Status.UNHEALTHY
    assert down.checks["redis"].status is Status.UNHEALTHY
    assert "refused" in (down.checks["redis"].error or "").lower()
    assert down.checks["postgres"].status is Status.HEALTHY
    private_redis.start()
    assert run_checks(settings).status is Status.HEALTHY


def test_postgres_stopped_then_started(private_postgres: PostgresCluster, redis_db: str) -> None:
    settings = settings_for(private_postgres.dsn, redis_db)
    assert run_checks(settings).status is Status.HEALTHY
    private_postgres.stop()
    down = run_checks(settings)
    assert down.status is Status.UNHEALTHY
    assert down.checks["postgres"].status is Status.UNHEALTHY
    assert down.checks["redis"].status is Status.HEALTHY
    private_postgres.start()
    assert run_checks(settings).status is Status.HEALTHY


def test_wrong_eviction_policy_and_connections_degrade(
    pg_database: tuple[str, str], private_redis: RedisServer
) -> None:
    import redis

    conn = redis.Redis.from_url(private_redis.url)
    conn.config_set("maxmemory-policy", "allkeys-lru")  # our private server, not the shared one
    conn.close()
    # Hold connections so that in-use / max crosses a low threshold.
    holders = [psycopg.connect(pg_database[1]) for _ in range(3)]
    try:
        report = run_checks(settings_for(pg_database[1], private_redis.url, connections_warn_ratio=0.01))
    finally:
        for holder in holders:
            holder.close()
    assert report.status is Status.DEGRADED
    assert any("noeviction" in w for w in report.checks["redis"].warnings)
    assert any("connections in use" in w for w in report.checks["postgres"].warnings)


@pytest.mark.parametrize("status_code", [200, 503])
def test_http_endpoint(status_code: int, pg_database: tuple[str, str], redis_db: str) -> None:
    import http.server
    import json
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "healthy" if status_code == 200 else "unhealthy"}).encode()
            self.send_response(status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/health"
        report = run_checks(settings_for(pg_database[1], redis_db, urls=[url]))
    finally:
        server.shutdown()
        server.server_close()
    check = report.checks[f"http:{url}"]
    assert check.details["status_code"] == status_code
    if status_code == 200:
        assert check.status is Status.HEALTHY
        assert check.details["body"] == {"status": "healthy"}
    else:
        assert check.status is Status.UNHEALTHY
        assert "HTTP 503" in (check.error or "")
        assert report.status is Status.UNHEALTHY
