"""The logger of whatever is running: the flow or task run's logger inside Prefect (so lines reach
the UI), a standard module logger outside it (plain functions called from tests or scripts)."""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Return the current run's logger, or ``logging.getLogger(name)`` outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)
