"""The logger of whatever is running: the flow or task run's logger inside Prefect (so lines reach
the UI), a standard module logger outside it (plain functions called from tests or scripts)."""

from __future__ import annotations

import logging
import sys


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Return the current run's logger, or ``logging.getLogger(name)`` outside a run."""
    # No Prefect loaded means no run: a short command that never needs Prefect (the WAL fetch that
    # PostgreSQL runs once per segment) does not pay for importing it.
    if "prefect" not in sys.modules:
        return logging.getLogger(name)
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)
