"""The CI deploy command: start ``deploy-release/<environment>`` on a Prefect server, follow it, and
say in the exit status and the last lines of the log what happened.

    python -m deployments.ci_deploy staging -p image_tag=1.4.2 --timeout 900
    scripts/ci-deploy.sh staging -p image_tag=1.4.2

It reads ``PREFECT_API_URL`` (the server's API, ending in ``/api``) and ``PREFECT_API_AUTH_STRING``
(``user:password`` of a server with ``PREFECT_SERVER_API_AUTH_STRING``) or ``PREFECT_API_KEY`` from
the environment (CI secrets). Unlike ``prefect deployment run --watch`` it never starts a throwaway
local server, prints the run's logs and its report's reason, and cancels the run when its own time
is up, so a deploy never goes on after CI said it timed out.

Exit status:
    0  deployed: the run completed.
    1  failed and rolled back: health is back on the previous release.
    2  could not start: API unreachable, not authenticated, no such deployment, bad parameters.
    3  timed out: the run did not finish within --timeout and was cancelled.
    4  failed otherwise: the rollback did not restore health, the run crashed or was cancelled
       elsewhere; a human must look (the reason is printed).
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

FLOW_NAME = "deploy-release"
REPORT_KEY = "deploy-release-{environment}"


class Exit(enum.IntEnum):
    """The command's exit statuses (see the module docstring)."""

    DEPLOYED = 0
    ROLLED_BACK = 1
    NOT_STARTED = 2
    TIMED_OUT = 3
    FAILED = 4


class CouldNotStart(Exception):
    """The run was not started; the message says what to fix."""


@dataclass(frozen=True)
class Outcome:
    """How a finished run ended, as CI reports it."""

    exit: Exit
    state: str
    reason: str
    report: str | None = None


def say(message: str) -> None:
    print(f"ci-deploy: {message}", flush=True)


def parse_parameters(pairs: Sequence[str], json_text: str | None) -> dict[str, Any]:
    """``key=value`` pairs (a value that parses as JSON is taken as JSON, like ``prefect deployment run
    -p``) over an optional JSON object.

    Raises:
        CouldNotStart: a pair without ``=`` or JSON that is not an object.
    """
    parameters: dict[str, Any] = {}
    if json_text:
        try:
            loaded = json.loads(json_text)
        except json.JSONDecodeError as exc:
            raise CouldNotStart(f"--params is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise CouldNotStart('--params must be a JSON object, e.g. \'{"image_tag": "1.4.2"}\'')
        parameters.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CouldNotStart(f"-p {pair!r}: expected key=value, e.g. -p image_tag=1.4.2")
        try:
            parameters[key] = json.loads(value)
        except json.JSONDecodeError:
            parameters[key] = value
    return parameters


def check_api_url(url: str | None) -> str:
    """The API URL, refused when it would make Prefect talk to something else than the server.

    Raises:
        CouldNotStart: unset (the Prefect CLI would start a throwaway local server), not http(s), or
            without the ``/api`` path of the server's API.
    """
    if not url:
        raise CouldNotStart(
            "PREFECT_API_URL is not set: set it to the Prefect server's API, e.g."
            " https://prefect.example.com/api (from a CI secret)"
        )
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise CouldNotStart(f"PREFECT_API_URL={url!r} is not an http(s) URL of the Prefect server's API")
    if "api" not in parts.path.strip("/").split("/"):
        raise CouldNotStart(
            f"PREFECT_API_URL={url!r} has no /api path: the API of a server at"
            f" {parts.scheme}://{parts.netloc} is {parts.scheme}://{parts.netloc}/api"
        )
    return url.rstrip("/")


def check_reachable(client: Any, url: str) -> None:
    """The server answers its health probe and accepts our credentials.

    Raises:
        CouldNotStart: unreachable or not authenticated.
    """
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        # /health is open even on a server with API auth: it tells "unreachable" from "refused".
        response = httpx.get(f"{url}/health", timeout=10)
    except httpx.HTTPError as exc:
        raise CouldNotStart(f"the Prefect API at {url} is unreachable: {exc}") from exc
    if response.status_code != 200:
        raise CouldNotStart(f"the Prefect API at {url} answered its health probe with {response.status_code}")
    try:
        client.hello()
    except PrefectHTTPStatusError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise CouldNotStart(
                f"the Prefect API at {url} refused our credentials (HTTP {status}): set"
                " PREFECT_API_AUTH_STRING to the server's user:password (or PREFECT_API_KEY for Prefect"
                " Cloud) from a CI secret"
            ) from exc
        raise CouldNotStart(f"the Prefect API at {url} answered HTTP {status}: {exc}") from exc


def start_run(
    client: Any, environment: str, parameters: dict[str, Any], idempotency_key: str | None
) -> tuple[Any, Any]:
    """The deployment and the flow run started on it.

    Raises:
        CouldNotStart: no such deployment, or the server refused the parameters.
    """
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    name = f"{FLOW_NAME}/{environment}"
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound as exc:
        raise CouldNotStart(
            f"deployment {name!r} does not exist on this server: deploy it (prefect deploy --all) or"
            " check the environment name"
        ) from exc
    try:
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters=parameters, idempotency_key=idempotency_key
        )
    except PrefectHTTPStatusError as exc:
        raise CouldNotStart(f"the server refused to start {name} with {parameters}: {exc}") from exc
    return deployment, run


def _report(client: Any, run_id: UUID, environment: str) -> tuple[str | None, str | None]:
    """The run's deploy report (markdown) and its outcome word from the report's description."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    key = REPORT_KEY.format(environment=environment)
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[key])
        )
    )
    if not artifacts:
        return None, None
    latest = max(artifacts, key=lambda a: a.created)
    # The flow describes its report as "Deploy to <environment>: <outcome>".
    outcome = (latest.description or "").partition(": ")[2] or None
    return (str(latest.data) if latest.data is not None else None), outcome


def classify(state_type: str, state_message: str, outcome: str | None) -> Exit:
    """The exit status of a finished run from its state and its report's outcome."""
    if state_type == "COMPLETED":
        return Exit.DEPLOYED
    if state_type == "FAILED" and outcome == "failed, rolled back":
        return Exit.ROLLED_BACK
    return Exit.FAILED


def _print_new_logs(client: Any, run_id: UUID, seen: int) -> int:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
        sort=LogSort.TIMESTAMP_ASC,
        offset=seen,
        limit=200,
    )
    for log in logs:
        level = logging.getLevelName(log.level)
        print(f"  {log.timestamp:%H:%M:%S} | {level:<7} | {log.message}", flush=True)
    return seen + len(logs)


def follow(client: Any, run: Any, environment: str, timeout: float, poll: float = 2.0) -> Outcome:
    """Follow a started run to its end (printing its logs) or cancel it when ``timeout`` is up."""
    from prefect.states import Cancelling

    deadline = time.monotonic() + timeout
    seen = 0
    last_state = None
    while True:
        current = client.read_flow_run(run.id)
        state = current.state
        if state is not None and state.name != last_state:
            last_state = state.name
            say(f"run {current.name} is {state.name}")
        try:
            seen = _print_new_logs(client, run.id, seen)
        except Exception as exc:  # logs are a courtesy: never let them decide the outcome
            say(f"could not read the run's logs: {exc}")
        if state is not None and state.is_final():
            seen = _print_new_logs(client, run.id, seen)
            report, outcome = _report(client, run.id, environment)
            code = classify(state.type.value, state.message or "", outcome)
            reason = state.message or ""
            return Outcome(code, state.name, reason, report)
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    waited_for = "no worker picked it up" if last_state in {"Scheduled", "Pending", "Late"} else "it ran"
    say(f"run {run.name} did not finish within {timeout:g} s ({waited_for}); cancelling it")
    client.set_flow_run_state(run.id, Cancelling(message=f"CI timeout of {timeout:g} s"), force=True)
    end = time.monotonic() + 30
    final = client.read_flow_run(run.id)
    while time.monotonic() < end and final.state is not None and not final.state.is_final():
        time.sleep(1)
        final = client.read_flow_run(run.id)
    report, _ = _report(client, run.id, environment)
    name = final.state.name if final.state is not None else "unknown"
    return Outcome(
        Exit.TIMED_OUT,
        name,
        f"timed out after {timeout:g} s and was cancelled ({name}); a deploy cut off may have left the"
        " environment between releases: check its report and run rollback-release if it is unhealthy",
        report,
    )


def run(argv: Sequence[str] | None = None) -> Exit:
    """Parse the arguments, start the run, follow it, and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="ci-deploy", description="Start deploy-release/<environment> and follow it to its end."
    )
    parser.add_argument("environment", help="the deployment's name, e.g. staging (deploy-release/staging)")
    parser.add_argument("-p", "--param", action="append", default=[], help="key=value (JSON values parsed)")
    parser.add_argument("--params", help="parameters as a JSON object (-p wins)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the run is cancelled")
    parser.add_argument("--idempotency-key", help="e.g. the CI pipeline id: a retried job joins its run")
    parser.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        parameters = parse_parameters(args.param, args.params)
        url = check_api_url(os.environ.get("PREFECT_API_URL"))
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            check_reachable(client, url)
            deployment, flow_run = start_run(client, args.environment, parameters, args.idempotency_key)
            say(f"started {FLOW_NAME}/{args.environment} run {flow_run.name} ({flow_run.id}) on {url}")
            say(f"parameters: {json.dumps({**(deployment.parameters or {}), **parameters}, default=str)}")
            outcome = follow(client, flow_run, args.environment, args.timeout, args.poll)
    except CouldNotStart as exc:
        say(f"could not start: {exc}")
        return Exit.NOT_STARTED
    if outcome.exit is not Exit.DEPLOYED and outcome.report:
        print("\n" + outcome.report + "\n", flush=True)
    verdict = {
        Exit.DEPLOYED: "deployed",
        Exit.ROLLED_BACK: "FAILED and rolled back",
        Exit.TIMED_OUT: "TIMED OUT",
        Exit.FAILED: "FAILED (not rolled back to health; look now)",
    }[outcome.exit]
    say(f"{verdict}: run ended {outcome.state}" + (f": {outcome.reason}" if outcome.reason else ""))
    return outcome.exit


def main() -> None:
    sys.exit(int(run()))


if __name__ == "__main__":
    main()
