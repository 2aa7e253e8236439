"""Test setup shared by every tier.

Environment first (before Prefect is imported anywhere): a private PREFECT_HOME, no API URL from the
developer's shell, no caching of ops tasks, and no OPS_* settings leaking in from outside.
Fixture modules under tests/fixtures/ (one per real service) are loaded as plugins.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_TEST_HOME = Path(tempfile.mkdtemp(prefix="swagger2mcp-ops-prefect-"))
for _name in list(os.environ):
    if (_name.startswith("OPS_") and not _name.startswith("OPS_TEST_")) or _name in {
        "PREFECT_API_URL",
        "PREFECT_API_KEY",
        "PREFECT_PROFILE",
    }:
        del os.environ[_name]
os.environ.update(
    {
        "PREFECT_HOME": str(_TEST_HOME),
        "PREFECT_TASKS_DEFAULT_NO_CACHE": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_UI_ENABLED": "false",
    }
)

# The helpers other fixture modules import come first, so each module is loaded (and its asserts
# rewritten) as a plugin before anything imports it.
_FIRST = ("ports", "pg_cluster", "prefect_server")
pytest_plugins = [f"tests.fixtures.{name}" for name in _FIRST] + sorted(
    f"tests.fixtures.{path.stem}"
    for path in (Path(__file__).parent / "fixtures").glob("*.py")
    if path.stem not in {"__init__", *_FIRST}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked ``long`` first (the order is otherwise kept): the suite runs in several processes
    a test file at a time, and a module of minutes started last would run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_unconfigure() -> None:
    """Remove the session's private PREFECT_HOME (its database and result storage)."""
    shutil.rmtree(_TEST_HOME, ignore_errors=True)
