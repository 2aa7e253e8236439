"""The Prefect tasks of this package, all wrapped here, one way: the plain functions stay callable
without Prefect (tests, other tasks), and a flow submits the wrapped ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from tasks.diagnostics.runner import run_diagnostic

P = ParamSpec("P")
R = TypeVar("R")


def diagnostic_task(fn: Callable[P, R], *, name: str, task_run_name: str | None = None) -> Task[P, R]:
    """``fn`` as a Prefect task that is never cached: a diagnosis must read the systems every time.

    Args:
        fn: the plain function; its signature is kept.
        name: the task's name in the UI.
        task_run_name: a template of each run's name, from ``fn``'s arguments.

    Returns:
        The task, submitted or called like ``fn``.
    """
    # The decorator form is the overload that keeps ``fn``'s signature for type checkers.
    return task(name=name, cache_policy=NO_CACHE, task_run_name=task_run_name)(fn)


run_diagnostic_task = diagnostic_task(run_diagnostic, name="run-diagnostic", task_run_name="diagnose-{name}")
