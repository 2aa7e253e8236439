"""A small flow that the production-layout tests deploy to a work pool (not collected as tests)."""

from __future__ import annotations

import os
import time

from prefect import flow


@flow(name="production-probe")
def production_probe(number: int, seconds: float = 1.0) -> dict[str, object]:
    """Stay ``seconds`` in the run and say where it ran (process, working directory, times)."""
    started = time.time()
    time.sleep(seconds)
    return {
        "number": number,
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "started": started,
        "ended": time.time(),
    }
