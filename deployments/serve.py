"""Serve every deployment of the project from one process: the no-infrastructure default.

The deployments are read from ``prefect.yaml``, the one place they are declared, so what this
process serves and what ``prefect deploy --all`` creates for a work pool can never drift apart.
Needs a running Prefect server (``PREFECT_API_URL``); see ``scripts/run-local.sh``.

    python -m deployments.serve                  # every deployment
    python -m deployments.serve health-check     # only deployments of these flows

SIGINT or SIGTERM stops it within ``SHUTDOWN_SECONDS``: Prefect's graceful stop runs first (cancel the
runs in flight, pause the schedules); when that cannot finish in time, typically because the Prefect
server went away at the same moment (Ctrl-C on ``make run`` reaches both) and every API call retries
for minutes, the flow run processes below this one are stopped and the process exits with status 3.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
# make run's whole stop must fit in 10 s: serve first, then the Prefect server (1-2 s).
SHUTDOWN_SECONDS = 6.0
EXIT_FORCED = 3


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment entry of prefect.yaml, as far as serving needs it."""

    name: str
    entrypoint: str
    description: str | None = None
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()
    concurrency_limit: dict[str, Any] | int | None = None
    triggers: tuple[dict[str, Any], ...] = ()

    @property
    def flow_module(self) -> str:
        return self.entrypoint.split(":")[0].removesuffix(".py").replace("/", ".")

    @property
    def flow_function(self) -> str:
        return self.entrypoint.split(":")[1]


def read_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """The deployments declared in prefect.yaml."""
    document = yaml.safe_load(path.read_text())
    specs = []
    for entry in document.get("deployments") or []:
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                description=entry.get("description"),
                tags=tuple(entry.get("tags") or ()),
                parameters=dict(entry.get("parameters") or {}),
                schedules=tuple(entry.get("schedules") or ()),
                concurrency_limit=entry.get("concurrency_limit"),
                triggers=tuple(entry.get("triggers") or ()),
            )
        )
    return specs


def load_flow(spec: DeploymentSpec) -> Any:
    """Import the flow object a spec's entrypoint names."""
    import importlib

    module = importlib.import_module(spec.flow_module)
    return getattr(module, spec.flow_function)


def to_runner_deployment(spec: DeploymentSpec) -> Any:
    """A ``RunnerDeployment`` with the spec's schedules, parameters, concurrency and triggers."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    schedules = []
    for entry in spec.schedules:
        active = bool(entry.get("active", True))
        if "cron" in entry:
            schedules.append(Cron(entry["cron"], timezone=entry.get("timezone"), active=active))
        elif "interval" in entry:
            schedules.append(Interval(entry["interval"], timezone=entry.get("timezone"), active=active))
        else:
            raise ValueError(f"deployment {spec.name}: schedule {entry} has neither cron nor interval")
    concurrency: Any = spec.concurrency_limit
    if isinstance(concurrency, dict):
        concurrency = ConcurrencyLimitConfig(**concurrency)
    triggers = [DeploymentEventTrigger(**trigger) for trigger in spec.triggers]
    return load_flow(spec).to_deployment(
        name=spec.name,
        description=spec.description,
        tags=list(spec.tags),
        parameters=spec.parameters,
        schedules=schedules or None,
        concurrency_limit=concurrency,
        triggers=triggers or None,
    )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class BoundedShutdown:
    """The first SIGINT/SIGTERM starts a graceful stop and arms a deadline; at the deadline the flow run
    processes below this one are stopped and the process exits, whatever the graceful part waits for.

    Args:
        stop: starts the graceful stop; called once, in the signal handler.
        seconds: how long the graceful stop may take.
    """

    def __init__(self, stop: Callable[[], None], seconds: float = SHUTDOWN_SECONDS) -> None:
        self.stop = stop
        self.seconds = seconds
        self.armed_at: float | None = None

    def install(self) -> None:
        """Handle SIGINT and SIGTERM (also when SIGINT came in ignored, as for a background job)."""
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        if self.armed_at is not None:
            # A second signal (make run forwards one after Ctrl-C) must not skip the graceful part.
            return
        self.armed_at = time.monotonic()
        print(
            f"serve: {signal.Signals(signum).name} received, stopping (at most {self.seconds:g} s)",
            file=sys.stderr,
            flush=True,
        )
        threading.Thread(target=self._deadline, name="serve-shutdown-deadline", daemon=True).start()
        self.stop()

    def _deadline(self) -> None:
        time.sleep(self.seconds)
        left = [pid for pid in descendants(os.getpid()) if _alive(pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            until = time.monotonic() + 1.0
            while time.monotonic() < until and any(_alive(pid) for pid in left):
                time.sleep(0.05)
            left = [pid for pid in left if _alive(pid)]
        print(
            f"serve: graceful stop did not finish within {self.seconds:g} s (is the Prefect server"
            " still reachable?); flow run processes stopped, exiting. Runs that were in flight may"
            " show as Running until the server marks them; check them in the UI.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_FORCED)


def serve_bounded(deployments: list[Any], seconds: float = SHUTDOWN_SECONDS) -> None:
    """``prefect.serve`` with a stop that ends within ``seconds`` on SIGINT or SIGTERM.

    Args:
        deployments: the ``RunnerDeployment`` objects to serve.
        seconds: the bound on the stop (see ``BoundedShutdown``).
    """
    import asyncio

    from prefect.flows import _display_serve_start_message
    from prefect.runner import Runner

    shutdown: BoundedShutdown

    class ServeRunner(Runner):
        """Prefect's runner, whose own SIGTERM handler goes through the bounded shutdown."""

        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            shutdown.handle(signal.SIGTERM)

        async def __aenter__(self) -> Any:
            entered = await super().__aenter__()
            self._logger.info(
                "Serving %d deployment(s); SIGINT or SIGTERM stops within %g s", len(deployments), seconds
            )
            return entered

    runner = ServeRunner(pause_on_shutdown=True)
    shutdown = BoundedShutdown(lambda: Runner.handle_sigterm(runner), seconds)
    # Before any API call: a signal while deployments register is bounded too.
    shutdown.install()
    for deployment in deployments:
        runner.add_deployment(deployment)
    _display_serve_start_message(*deployments)
    asyncio.run(runner.start())


def main(argv: list[str]) -> None:
    wanted = set(argv)
    specs = [
        s for s in read_specs() if not wanted or s.entrypoint.split(":")[1] in wanted or s.name in wanted
    ]
    if not specs:
        raise SystemExit(f"no deployment matches {sorted(wanted)}; see prefect.yaml")
    serve_bounded([to_runner_deployment(spec) for spec in specs])


if __name__ == "__main__":
    main(sys.argv[1:])
