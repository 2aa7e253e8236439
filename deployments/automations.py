"""Apply the routes of ``automations.yaml`` (beside prefect.yaml) as Prefect automations.

Each route becomes one automation, ``swagger2mcp-ops/<route>``, that runs the ``notify-event/on-event``
deployment with the triggering event's facts. Applying is idempotent: automations are updated in place
by name, duplicates and routes no longer declared are deleted. Needs a running Prefect server
(``PREFECT_API_URL``); ``scripts/run-local.sh`` runs it once the server is up.

    python -m deployments.automations apply     # create / update / delete, print what changed
    python -m deployments.automations show      # the automations the routes make, as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from uuid import UUID

from deployments.serve import PROJECT_ROOT, load_flow, read_specs, to_runner_deployment

ROUTES_FILE = PROJECT_ROOT / "automations.yaml"
NOTIFY_ENTRYPOINT = "flows/notifications.py:notify_event"
NOTIFY_DEPLOYMENT = "on-event"
# The escalation's own flows never page about themselves: a broken channel must not loop.
ESCALATION_FLOWS = frozenset({"notify-event", "notify-test"})


def project_flow_names() -> list[str]:
    """The names of every flow deployed from prefect.yaml, except the escalation's own."""
    return sorted({load_flow(spec).name for spec in read_specs()} - ESCALATION_FLOWS)


def notify_deployment_id() -> UUID:
    """The id of notify-event/on-event, registered from prefect.yaml first when the server lacks it
    (``serve`` and ``prefect deploy`` later update the same deployment)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    specs = [s for s in read_specs() if s.entrypoint == NOTIFY_ENTRYPOINT and s.name == NOTIFY_DEPLOYMENT]
    if not specs:
        raise SystemExit(f"prefect.yaml declares no {NOTIFY_ENTRYPOINT} deployment named {NOTIFY_DEPLOYMENT}")
    flow_name = load_flow(specs[0]).name
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"{flow_name}/{NOTIFY_DEPLOYMENT}").id
        except ObjectNotFound:
            pass
    return to_runner_deployment(specs[0]).apply()


def main(argv: list[str]) -> int:
    from tasks.notifications import apply_routes, automation_for, load_routes

    parser = argparse.ArgumentParser(
        prog="python -m deployments.automations", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["apply", "show"])
    parser.add_argument(
        "--routes", type=Path, default=ROUTES_FILE, help="the routes file (default automations.yaml)"
    )
    args = parser.parse_args(argv)
    routes = load_routes(args.routes)
    flows = project_flow_names()
    if args.command == "show":
        placeholder = UUID(int=0)
        print(
            json.dumps(
                [automation_for(r, placeholder, flows).model_dump(mode="json") for r in routes], indent=2
            )
        )
        return 0
    result = apply_routes(routes, notify_deployment_id(), flows)
    for label, names in (
        ("created", result.created),
        ("updated", result.updated),
        ("deleted", result.deleted),
    ):
        for name in names:
            print(f"{label}: {name}")
    print(f"{len(routes)} routes applied as automations")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
