"""The one way a plain function of this project becomes a Prefect task.

Ops tasks have side effects, so none is ever cached (a cached task silently does not run). Retries
are for what another attempt can fix (:func:`tasks.retrying.is_transient`: a dropped connection, a
timeout, a 5xx or throttling answer); anything else, and any error listed in ``permanent``, fails
the task at once with its cause. The decorator keeps the
wrapped function's signature (``Task[P, R]``), so callers and mypy see the real parameters.

    create_backup_task = ops_task(create_backup, name="create-backup", retries=2, retry_delay_seconds=30)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from tasks.retrying import is_transient
from tasks.runlog import run_logger

P = ParamSpec("P")
R = TypeVar("R")


def retry_unless(
    permanent: tuple[type[BaseException], ...],
) -> Callable[[Task[..., Any], TaskRun, State[Any]], bool]:
    """A retry condition: retry a failed attempt only when its error is transient and not one of
    ``permanent``."""

    def condition(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception as exc:
            retry = is_transient(exc)
            if not retry:
                run_logger(__name__).info("not retried: %s is not a transient failure", type(exc).__name__)
            return retry
        return True

    return condition


def ops_task(
    fn: Callable[P, R],
    *,
    name: str,
    retries: int = 0,
    retry_delay_seconds: float = 0,
    permanent: tuple[type[BaseException], ...] = (),
    timeout_seconds: float | None = None,
    task_run_name: str | None = None,
) -> Task[P, R]:
    """Wrap ``fn`` as an uncached task named ``name``.

    Args:
        fn: the plain, typed function (tests call it without Prefect).
        name: the task's name in the UI (verb-noun).
        retries: further attempts after a transient failure that is not ``permanent``.
        retry_delay_seconds: the wait between attempts.
        permanent: error types that no retry can fix; they fail the task at once.
        timeout_seconds: a hard limit for one attempt (only effective on the flow's main thread).
        task_run_name: a template of each run's name, from ``fn``'s arguments (``"diagnose-{name}"``).

    Returns:
        The task, with the same parameters and return type as ``fn``.
    """
    decorate = task(
        name=name,
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_unless(permanent) if retries else None,
        timeout_seconds=timeout_seconds,
        task_run_name=task_run_name,
    )
    # The decorator form is the overload that keeps ``fn``'s signature for type checkers.
    return decorate(fn)
