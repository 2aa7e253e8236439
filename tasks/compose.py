"""The Docker Compose runtime: the Docker Engine API (``docker`` SDK) to read, ``docker compose`` v2 to act.

Services are the project's containers, found by Compose's own labels. Reads (status, logs, stats)
use the Engine API; changes that need Compose semantics (restart, recreate with another image,
scale) run the ``docker compose`` CLI through the one command runner.

Image changes are pinned in a Compose override file (``runtime.compose.images_file``), passed to every
``docker compose`` call after the project's own files, so the project's files are never rewritten
and a later ``up`` keeps the released images. Compose keeps no rollout history: ``history`` and
``rollback`` read the release records given to the runtime (``tasks.releases.release_history``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import yaml

from tasks.commands import CommandResult, run_command
from tasks.errors import CommandError
from tasks.runtime import (
    EXIT_NOT_FOUND,
    ChangeRecord,
    ExecResult,
    IsolationPlan,
    ReleaseHistory,
    ResourceUsage,
    Revision,
    RuntimeOperationFailed,
    RuntimeUnavailable,
    ServicesNotReady,
    ServiceStatus,
    not_ready_summary,
)
from tasks.settings import OpsSettings

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"
# What an exec may print that is kept (diagnostic probes print a line or two).
EXEC_OUTPUT_LIMIT = 64 * 1024


_DOCKER_TIME = re.compile(
    r"^(?P<head>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<frac>\d+))?(?P<zone>Z|[+-]\d\d:\d\d)$"
)


def parse_docker_time(value: str | None) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds, Python's microseconds; the zero time is None."""
    match = _DOCKER_TIME.match(value or "")
    if match is None or match["head"].startswith("0001-"):
        return None
    zone = "+00:00" if match["zone"] == "Z" else match["zone"]
    return datetime.fromisoformat(f"{match['head']}.{(match['frac'] or '0')[:6]:0<6}{zone}")


class ComposeRuntime:
    """``runtime.kind = "compose"``: one Compose project on one Docker Engine."""

    kind = "compose"

    def __init__(self, settings: OpsSettings, release_history: ReleaseHistory) -> None:
        self.settings = settings
        self.release_history = release_history
        self.config = settings.runtime.compose
        self.project = self.config.project or settings.stack
        self.images_file = self.config.images_file or (
            settings.runtime.releases_dir / f"compose-images-{self.project}.yml"
        )
        self._client: Any = None

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The Docker SDK client (imported here: only this runtime needs it)."""
        if self._client is None:
            import docker

            base_url = self.config.docker_host or os.environ.get("DOCKER_HOST")
            try:
                client = docker.DockerClient(base_url=base_url, timeout=60)
                client.ping()
            except Exception as exc:
                raise RuntimeUnavailable(
                    f"cannot reach the Docker Engine at {base_url or 'the default socket'}: {exc}."
                    " Start dockerd or set OPS_RUNTIME__COMPOSE__DOCKER_HOST"
                ) from None
            self._client = client
        return self._client

    def _env(self) -> dict[str, str]:
        return self.config.docker_env()

    def compose_argv(self, *args: str) -> list[str]:
        """``docker compose`` with the project name, its files, the image pins and the env file."""
        argv = [*self.config.command, "--project-name", self.project]
        for path in self.config.files:
            argv += ["--file", os.fspath(path)]
        if self.images_file.exists():
            argv += ["--file", os.fspath(self.images_file)]
        if self.config.env_file is not None:
            argv += ["--env-file", os.fspath(self.config.env_file)]
        if self.config.project_directory is not None:
            argv += ["--project-directory", os.fspath(self.config.project_directory)]
        return [*argv, *args]

    def _compose(self, *args: str, timeout: float | None = None) -> CommandResult:
        return run_command(
            self.compose_argv(*args),
            timeout=timeout or self.config.command_timeout_seconds,
            env=self._env(),
        )

    def configured_services(self) -> list[str]:
        """Services the Compose files define (``docker compose config --services``)."""
        result = self._compose("config", "--services", timeout=60)
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]

    def _check_services(self, services: Sequence[str]) -> None:
        if not services:
            raise RuntimeOperationFailed("no services named; name at least one")
        known = self.configured_services()
        unknown = [s for s in services if s not in known]
        if unknown:
            raise RuntimeOperationFailed(
                f"unknown Compose service(s) {', '.join(unknown)} in project {self.project};"
                f" the files define: {', '.join(known) or 'nothing'}. Nothing was changed."
            )

    def _containers(self, service: str | None = None) -> list[Any]:
        labels = [f"{PROJECT_LABEL}={self.project}"]
        if service is not None:
            labels.append(f"{SERVICE_LABEL}={service}")
        containers = self.client.containers.list(all=True, filters={"label": labels})
        return [c for c in containers if c.labels.get(ONEOFF_LABEL, "False") != "True"]

    # -- reads ----------------------------------------------------------------------------------

    def _status(self, name: str, containers: list[Any]) -> ServiceStatus:
        if not containers:
            return ServiceStatus(name=name, image=None, desired=1, ready=0, state="missing")
        ready = 0
        states = []
        for container in containers:
            state = container.attrs.get("State", {})
            health = (state.get("Health") or {}).get("Status")
            running = state.get("Status") == "running"
            if running and health in (None, "healthy"):
                ready += 1
            states.append(f"{state.get('Status', '?')}{f' ({health})' if health else ''}")
        newest = max(containers, key=lambda c: c.attrs.get("State", {}).get("StartedAt") or "")
        return ServiceStatus(
            name=name,
            image=newest.attrs.get("Config", {}).get("Image"),
            desired=len(containers),
            ready=ready,
            state=", ".join(sorted(set(states))),
            restarts=sum(int(c.attrs.get("RestartCount") or 0) for c in containers),
            started_at=parse_docker_time(newest.attrs.get("State", {}).get("StartedAt")),
            revision=(newest.attrs.get("Image") or "").removeprefix("sha256:")[:12] or None,
        )

    def list_services(self) -> list[ServiceStatus]:
        """Every service of the project, and each configured one (``missing`` when it has no container)."""
        by_service: dict[str, list[Any]] = {name: [] for name in self.settings.runtime.services}
        for container in self._containers():
            by_service.setdefault(container.labels.get(SERVICE_LABEL, "?"), []).append(container)
        return [self._status(name, containers) for name, containers in sorted(by_service.items())]

    def _service_status(self, service: str) -> ServiceStatus:
        return self._status(service, self._containers(service))

    def logs(self, service: str, tail: int = 100) -> str:
        """The last ``tail`` lines of each of the service's containers."""
        containers = self._containers(service)
        parts = []
        for container in containers:
            text = container.logs(tail=tail, stdout=True, stderr=True).decode("utf-8", errors="replace")
            parts.append(text if len(containers) == 1 else f"== {container.name} ==\n{text}")
        return "\n".join(parts)

    def resource_usage(self) -> list[ResourceUsage]:
        """CPU percent and memory per service, summed over its running containers (Engine stats)."""
        usage: dict[str, list[float | int]] = {}
        for container in self._containers():
            if container.status != "running":
                continue
            stats = container.stats(stream=False)
            cpu = stats.get("cpu_stats", {})
            pre = stats.get("precpu_stats", {})
            cpu_delta = cpu.get("cpu_usage", {}).get("total_usage", 0) - pre.get("cpu_usage", {}).get(
                "total_usage", 0
            )
            system_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
            cpus = cpu.get("online_cpus") or 1
            percent = (cpu_delta / system_delta) * cpus * 100 if system_delta > 0 else 0.0
            memory = stats.get("memory_stats", {})
            cache = memory.get("stats", {}).get("inactive_file", 0)
            used = max(0, int(memory.get("usage", 0)) - int(cache))
            total = usage.setdefault(container.labels.get(SERVICE_LABEL, "?"), [0.0, 0])
            total[0] += percent
            total[1] += used
        return [
            ResourceUsage(name=name, cpu_percent=round(float(cpu), 2), memory_bytes=int(mem))
            for name, (cpu, mem) in sorted(usage.items())
        ]

    # -- changes --------------------------------------------------------------------------------

    def restart(self, services: Sequence[str]) -> list[ChangeRecord]:
        """``docker compose restart`` the services; the records show each start time before and after."""
        self._check_services(services)
        before = {s: self._service_status(s) for s in services}
        missing = [s for s, status in before.items() if status.state == "missing"]
        if missing:
            raise RuntimeOperationFailed(
                f"cannot restart {', '.join(missing)}: no container exists; start the project first"
            )
        result = self._compose("restart", "--timeout", str(self.config.stop_timeout_seconds), *services)
        records = []
        for service in services:
            after = self._service_status(service)
            records.append(
                ChangeRecord(
                    operation="restart",
                    target=service,
                    changed=after.started_at != before[service].started_at,
                    before={"started_at": str(before[service].started_at)},
                    after={"started_at": str(after.started_at)},
                    commands=(result.command_line,),
                )
            )
        return records

    def scale(self, service: str, replicas: int) -> ChangeRecord:
        """Run ``replicas`` containers of ``service`` (``up --scale``; 0 stops and removes them)."""
        if replicas < 0:
            raise RuntimeOperationFailed(f"replicas must be 0 or more, not {replicas}")
        self._check_services([service])
        before = len([c for c in self._containers(service) if c.status == "running"])
        if before == replicas and len(self._containers(service)) == replicas:
            return ChangeRecord("scale", service, False, {"replicas": str(before)}, {"replicas": str(before)})
        result = self._compose(
            "up", "--detach", "--no-deps", "--no-recreate", "--scale", f"{service}={replicas}", service
        )
        after = len([c for c in self._containers(service) if c.status == "running"])
        return ChangeRecord(
            operation="scale",
            target=service,
            changed=before != after,
            before={"replicas": str(before)},
            after={"replicas": str(after)},
            commands=(result.command_line,),
        )

    def pinned_images(self) -> dict[str, str]:
        """The images pinned in the override file (empty when there is none)."""
        if not self.images_file.exists():
            return {}
        document = yaml.safe_load(self.images_file.read_text()) or {}
        return {
            name: spec["image"]
            for name, spec in (document.get("services") or {}).items()
            if isinstance(spec, dict) and spec.get("image")
        }

    def _write_pins(self, pins: dict[str, str]) -> None:
        self.images_file.parent.mkdir(parents=True, exist_ok=True)
        document = {"services": {name: {"image": image} for name, image in sorted(pins.items())}}
        temporary = self.images_file.with_suffix(".tmp")
        temporary.write_text(
            "# Written by swagger2mcp-ops (deploy-release / rollback-release): the released images.\n"
            + yaml.safe_dump(document, sort_keys=True)
        )
        os.replace(temporary, self.images_file)

    def _restore_pins(self, old_pins: dict[str, str], had_file: bool) -> None:
        if had_file:
            self._write_pins(old_pins)
        else:
            self.images_file.unlink(missing_ok=True)

    def _image_present(self, image: str) -> bool:
        import docker.errors

        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            return False
        return True

    def set_images(self, images: dict[str, str], operation: str = "set-image") -> list[ChangeRecord]:
        """Pin the images and recreate only the services whose image changes (``up --no-deps``).

        Raises:
            RuntimeOperationFailed: unknown service, or Compose could not recreate (an image that does
                not exist or cannot be pulled); the pins are restored to what they were.
        """
        self._check_services(list(images))
        current = {s: self._service_status(s).image for s in images}
        changes = {s: image for s, image in images.items() if current[s] != image}
        if not changes:
            return [
                ChangeRecord(operation, s, False, {"image": str(current[s])}, {"image": image})
                for s, image in images.items()
            ]
        if self.config.pull == "never":
            absent = [image for image in changes.values() if not self._image_present(image)]
            if absent:
                raise RuntimeOperationFailed(
                    f"image(s) {', '.join(absent)} not on this Docker Engine and runtime.compose.pull is"
                    " 'never': build or load them first, or fix the tag. Nothing was changed."
                )
        # `up` brings a service back to its file's count (1 unless it says otherwise): the count it
        # runs now is passed on, so a deploy or rollback keeps what scale-services set.
        counts = {s: len(self._containers(s)) for s in changes}
        keep = [arg for s, n in counts.items() if n > 0 for arg in ("--scale", f"{s}={n}")]
        old_pins = self.pinned_images()
        had_file = self.images_file.exists()
        self._write_pins({**old_pins, **changes})
        try:
            result = self._compose("up", "--detach", "--no-deps", "--pull", self.config.pull, *keep, *changes)
        except CommandError as exc:
            self._restore_pins(old_pins, had_file)
            raise RuntimeOperationFailed(
                f"docker compose could not run {', '.join(f'{s}={i}' for s, i in changes.items())}"
                f" (pins restored): {exc}"
            ) from None
        # Compose may report a failed recreate on stderr and still exit 0: check what runs now.
        running = {s: self._service_status(s).image for s in changes}
        wrong = {s: running[s] for s, image in changes.items() if running[s] != image}
        if wrong:
            self._restore_pins(old_pins, had_file)
            errors = [line for line in result.stderr.splitlines() if "rror" in line][-3:]
            raise RuntimeOperationFailed(
                f"docker compose did not switch {', '.join(f'{s} to {changes[s]}' for s in wrong)}"
                f" (running: {', '.join(f'{s}={i}' for s, i in wrong.items())}; pins restored)"
                + (f": {' | '.join(e.strip() for e in errors)}" if errors else "")
            )
        return [
            ChangeRecord(
                operation=operation,
                target=s,
                changed=s in changes,
                before={"image": str(current[s])},
                after={"image": str(running.get(s, current[s]))},
                commands=(result.command_line,) if s in changes else (),
            )
            for s, image in images.items()
        ]

    def wait_ready(self, services: Sequence[str], timeout: float) -> list[ServiceStatus]:
        """Poll until every container of the services runs (and is healthy when it has a healthcheck).

        Raises:
            ServicesNotReady: the timeout passed; the message shows each service's state.
        """
        deadline = time.monotonic() + timeout
        interval = min(self.settings.runtime.poll_interval_seconds, max(timeout / 10, 0.2))
        while True:
            statuses = [self._service_status(s) for s in services]
            if all(s.healthy for s in statuses):
                return statuses
            # Docker marks a container unhealthy only after its healthcheck failed `retries` times in a
            # row: waiting longer will not help.
            unhealthy = [s for s in statuses if "(unhealthy)" in s.state]
            if unhealthy or time.monotonic() >= deadline:
                why = "healthcheck failing" if unhealthy else f"not ready within {timeout:g}s"
                raise ServicesNotReady(
                    f"{why}: {not_ready_summary(statuses)}; see the service logs (diagnose flow)", statuses
                )
            time.sleep(interval)

    # -- history (from the release records: Compose keeps none) ---------------------------------

    def history(self, service: str) -> list[Revision]:
        """The service's images over the recorded releases that ran healthy, oldest first (Compose
        keeps no rollout history: the release records given to this runtime are its history)."""
        running = self._service_status(service).image
        revisions = list(self.release_history(service))
        if revisions and revisions[-1].images[service] == running:
            revisions[-1] = dataclasses.replace(revisions[-1], current=True)
        return revisions

    def rollback(self, service: str, revision: str | None = None) -> ChangeRecord:
        """Back to the image of a recorded release (``revision`` = release id), or the previous one."""
        revisions = self.history(service)
        running = self._service_status(service).image
        if revision is not None:
            chosen = [r for r in revisions if r.revision == revision]
        else:
            chosen = [r for r in revisions if r.images[service] != running][-1:]
        if not chosen:
            raise RuntimeOperationFailed(
                f"no recorded release of {service} to roll back to"
                f"{f' with id {revision}' if revision else ' (all recorded releases run the same image)'}"
            )
        return self.set_images({service: chosen[0].images[service]}, operation="rollback")[0]

    def single_replica_reason(self, service: str) -> str | None:
        """A ``container_name`` or a published host port that is one fixed port (not a range): Docker
        names each container once and binds a host port once, so a second replica cannot start (for
        a fixed name Compose only warns and keeps one). Read from ``docker compose config``.

        Raises:
            RuntimeOperationFailed: the Compose files define no such service.
        """
        # The resolved configuration holds the environment's values: not logged.
        result = run_command(
            self.compose_argv("config", "--format", "json"),
            timeout=60,
            env=self._env(),
            log_output=False,
        )
        services = (json.loads(result.stdout or "{}").get("services")) or {}
        if service not in services:
            raise RuntimeOperationFailed(
                f"unknown Compose service {service} in project {self.project}; the files define:"
                f" {', '.join(sorted(services)) or 'nothing'}. Nothing was changed."
            )
        spec = services[service]
        reasons = []
        if spec.get("container_name"):
            reasons.append(f"it has a fixed container_name ({spec['container_name']})")
        for port in spec.get("ports") or []:
            published = str(port.get("published") or "")
            if published and "-" not in published:
                host = f"{port['host_ip']}:" if port.get("host_ip") else ""
                reasons.append(f"it publishes the fixed host port {host}{published}")
        return "; ".join(reasons) or None

    # -- commands inside a service --------------------------------------------------------------

    def exec(self, service: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """``docker exec`` without stdin or TTY in the service's first running container (by name).

        The Engine API has no time limit for an exec: past ``timeout`` the result says so
        (``exit_code`` None) and the command is left to end by its own limits.

        Raises:
            RuntimeOperationFailed: no running container of the service.
        """
        running = sorted(
            (c for c in self._containers(service) if c.status == "running"), key=lambda c: c.name
        )
        if not running:
            raise RuntimeOperationFailed(
                f"no running container of {service} in project {self.project} to run a command in;"
                " start it (restart-services) or check runtime.services"
            )
        container = running[0]
        api = self.client.api
        import docker.errors

        try:
            created = api.exec_create(
                container.id, list(argv), stdout=True, stderr=True, stdin=False, tty=False
            )
        except docker.errors.APIError as exc:  # e.g. the container stopped since it was listed
            raise RuntimeOperationFailed(f"cannot run a command in {container.name}: {exc}") from None
        outcome: list[tuple[bytes | None, bytes | None]] = []
        failure: list[BaseException] = []

        def start() -> None:
            try:
                outcome.append(api.exec_start(created["Id"], demux=True))
            except Exception as exc:
                failure.append(exc)

        thread = threading.Thread(target=start, daemon=True, name=f"docker-exec-{service}")
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            return ExecResult(service, container.name, tuple(argv), None, "", f"no end within {timeout:g} s")
        if failure:
            raise RuntimeUnavailable(f"docker exec in {container.name} failed: {failure[0]}") from None
        raw_out, raw_err = outcome[0]
        stdout = (raw_out or b"")[:EXEC_OUTPUT_LIMIT].decode("utf-8", errors="replace")
        stderr = (raw_err or b"")[:EXEC_OUTPUT_LIMIT].decode("utf-8", errors="replace")
        code = api.exec_inspect(created["Id"]).get("ExitCode")
        # The Engine reports a command it could not start as exit 126 (or 127) with the OCI runtime's
        # message on stdout: the shell's "not found", so callers can try another command.
        if code in (126, 127) and "OCI runtime exec failed" in stdout:
            missing = "executable file not found" in stdout or "no such file or directory" in stdout
            return ExecResult(
                service, container.name, tuple(argv), EXIT_NOT_FOUND if missing else 126, "", stdout.strip()
            )
        return ExecResult(service, container.name, tuple(argv), code, stdout, stderr)

    # -- isolation (security incident): the public entry stopped, and started again -----------------

    def _running(self, service: str) -> int:
        return len([c for c in self._containers(service) if c.status == "running"])

    def plan_isolation(self, services: Sequence[str] | None = None) -> IsolationPlan:
        """Stop the services that take traffic from outside (``public_entry_services``, or ``services``).

        With host networking or published ports, a Compose service cannot be fenced off from outside
        while it runs: the entry (the reverse proxy) is stopped instead, its containers kept, so that
        ``docker compose start`` brings back the very same ones.

        Raises:
            RuntimeOperationFailed: no entry service configured, or one the Compose files do not define.
        """
        targets = list(services) if services else list(self.config.public_entry_services)
        if not targets:
            raise RuntimeOperationFailed(
                "no public entry service to stop: set OPS_RUNTIME__COMPOSE__PUBLIC_ENTRY_SERVICES (the"
                ' reverse proxy, e.g. ["nginx"]) or name the services. Nothing was changed.'
            )
        self._check_services(targets)
        running = {s: self._running(s) for s in targets}
        stop = {s: n for s, n in running.items() if n}
        timeout = str(self.config.stop_timeout_seconds)
        return IsolationPlan(
            runtime=self.kind,
            services=tuple(services or ()),
            actions=tuple(
                f"stop {s} ({n} running container(s)): docker compose stop --timeout {timeout} {s}"
                for s, n in stop.items()
            ),
            undo=tuple(
                f"start {s} again ({n} container(s)): docker compose start {s}" for s, n in stop.items()
            ),
            state={"running": stop},
            stopped_services=tuple(targets),
            notes=tuple(f"{s}: no running container, nothing to stop" for s, n in running.items() if not n),
        )

    def isolate(self, plan: IsolationPlan) -> list[ChangeRecord]:
        """``docker compose stop`` the entry services that ran; each is read back stopped."""
        running: dict[str, int] = dict(plan.state.get("running") or {})
        if not running:
            return []
        before = {s: self._running(s) for s in running}
        result = self._compose("stop", "--timeout", str(self.config.stop_timeout_seconds), *running)
        after = {s: self._running(s) for s in running}
        still = [s for s, n in after.items() if n]
        if still:
            raise RuntimeOperationFailed(
                f"{', '.join(still)} still run(s) after docker compose stop; external traffic is not blocked."
                " Stop it by hand (docker compose stop) and see its logs"
            )
        return [
            ChangeRecord(
                operation="isolate",
                target=s,
                changed=before[s] != after[s],
                before={"running": str(before[s])},
                after={"running": str(after[s])},
                commands=(result.command_line,),
            )
            for s in running
        ]

    def end_isolation(self, plan: IsolationPlan) -> list[ChangeRecord]:
        """``docker compose start`` what the isolation stopped, back to the recorded container count.

        Containers removed meanwhile (``docker compose down``) are created again (``up --scale``).

        Raises:
            RuntimeOperationFailed: a service does not run its recorded count afterwards.
        """
        running: dict[str, int] = {s: int(n) for s, n in (plan.state.get("running") or {}).items()}
        if not running:
            return []
        before = {s: self._running(s) for s in running}
        commands = [self._compose("start", *running).command_line]
        for service, count in running.items():
            if self._running(service) < count:
                commands += self.scale(service, count).commands
        after = {s: self._running(s) for s in running}
        short = [f"{s} {after[s]}/{n}" for s, n in running.items() if after[s] < n]
        if short:
            raise RuntimeOperationFailed(
                f"not running as recorded after docker compose start: {', '.join(short)}; see the service"
                " logs (diagnose flow)"
            )
        return [
            ChangeRecord(
                operation="end-isolation",
                target=s,
                changed=before[s] != after[s],
                before={"running": str(before[s])},
                after={"running": str(after[s])},
                commands=tuple(commands),
            )
            for s in running
        ]
