"""Commands inside a service on Kubernetes: ``kubectl exec`` (pods/exec over a websocket), and the exit
code an exec reports on its status channel."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tasks.runtime import EXIT_NOT_FOUND, ExecResult, RuntimeOperationFailed, RuntimeUnavailable

if TYPE_CHECKING:
    from tasks.kubernetes.runtime import KubernetesRuntime

# What an exec may print that is kept (diagnostic probes print a line or two).
EXEC_OUTPUT_LIMIT = 64 * 1024


def exec_in_pod(runtime: KubernetesRuntime, service: str, argv: Sequence[str], timeout: float) -> ExecResult:
    """``kubectl exec`` (pods/exec over a websocket) without stdin or TTY in the service's first
    running pod (by name), in its container named like the service (else its first container).

    Past ``timeout`` the result says so (``exit_code`` None) and the command is left to end by its
    own limits.

    Raises:
        RuntimeOperationFailed: the Deployment does not exist or has no running pod.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from kubernetes.stream import stream
    from kubernetes.stream.ws_client import ERROR_CHANNEL, STDERR_CHANNEL, STDOUT_CHANNEL

    running = sorted(
        (
            p
            for p in runtime._pods(runtime._deployment(service))
            if p.status is not None and p.status.phase == "Running" and p.metadata.deletion_timestamp is None
        ),
        key=lambda p: p.metadata.name,
    )
    if not running:
        raise RuntimeOperationFailed(
            f"no running pod of {service} in namespace {runtime.namespace} to run a command in;"
            " see the Deployment's status (diagnose services)"
        )
    pod = running[0]
    container = runtime._main_container(service, pod).name
    # stream() swaps the API client's transport while it connects: an ApiClient of its own keeps
    # other calls of this runtime (other threads) on plain HTTP.
    core = client.CoreV1Api(client.ApiClient(runtime.api_client.configuration))
    try:
        connection = stream(
            core.connect_get_namespaced_pod_exec,
            pod.metadata.name,
            runtime.namespace,
            container=container,
            command=list(argv),
            stdin=False,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
            _request_timeout=timeout,
        )
    except ApiException as exc:
        raise runtime._unavailable(exc) from None
    try:
        connection.run_forever(timeout=timeout)
        finished = not connection.is_open()
        stdout = str(connection.read_channel(STDOUT_CHANNEL, 0))[:EXEC_OUTPUT_LIMIT]
        stderr = str(connection.read_channel(STDERR_CHANNEL, 0))[:EXEC_OUTPUT_LIMIT]
        status = str(connection.read_channel(ERROR_CHANNEL, 0))
    except Exception as exc:  # the websocket broke (protocol error, connection reset)
        raise RuntimeUnavailable(
            f"exec in pod {pod.metadata.name} through the Kubernetes API failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        connection.close()
    name, command = pod.metadata.name, tuple(argv)
    if not finished:
        return ExecResult(service, name, command, None, stdout, f"no end within {timeout:g} s")
    code, message = exec_status(status)
    if message and code != 0 and not stderr.strip():
        stderr = message
    return ExecResult(service, name, command, code, stdout, stderr)


def exec_status(status: str) -> tuple[int, str]:
    """The exit code and message of an exec from its status channel (a ``v1.Status`` in JSON).

    ``Success`` is 0; a ``NonZeroExitCode`` carries the code in its ``ExitCode`` cause; a command the
    container runtime could not start (``executable file not found``) is :data:`EXIT_NOT_FOUND`;
    any other failure 126 (could not run), with the API's message.
    """
    if not status.strip():
        return 126, "the exec ended without a status"
    try:
        document = json.loads(status)
    except ValueError:
        return 126, status.strip()[:400]
    if document.get("status") == "Success":
        return 0, ""
    message = str(document.get("message") or "")
    for cause in (document.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            with contextlib.suppress(TypeError, ValueError):
                return int(cause.get("message")), message
    if "executable file not found" in message or "no such file or directory" in message:
        return EXIT_NOT_FOUND, message
    return 126, message
