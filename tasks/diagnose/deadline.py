"""One deadline for blocking calls that have no timeout of their own (a check that hangs, a DNS
lookup): the call runs in a daemon thread that is left behind when the deadline passes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """Run ``fn`` in a daemon thread; past ``seconds`` raise TimeoutError and leave it behind.

    ``getaddrinfo`` has no timeout of its own and may block for the resolver's full retry cycle.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="diagnose-deadline")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if failure:
        raise failure[0]
    return result[0]
