"""Alembic in-process, through the application's own migration environment (its ``env.py``): the
``Config``, the script directory, the current revisions, the pending ones and their offline SQL.

Alembic is imported inside the functions: a project that migrates with a command tool never loads it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

from tasks import postgres
from tasks.errors import ParameterError
from tasks.migrate.config import target_dsn
from tasks.settings import OpsSettings


@contextlib.contextmanager
def logging_kept() -> Iterator[None]:
    """Keep the process's logging as it was around the app's env.py.

    The stock env.py calls ``logging.config.fileConfig`` on the ini file, which disables every logger
    that already exists (Prefect's run loggers among them) and replaces the root handlers.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = {
        name: (lg.disabled, lg.level, list(lg.handlers), lg.propagate)
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, (disabled, lvl, hdlrs, propagate) in loggers.items():
            lg = logging.getLogger(name)
            lg.disabled, lg.propagate = disabled, propagate
            lg.setLevel(lvl)
            lg.handlers[:] = hdlrs


def _alembic_url(settings: OpsSettings) -> str:
    """SQLAlchemy URL for the app's env.py, naming the session and bounding each statement."""
    base = postgres.sqlalchemy_url(target_dsn(settings))
    options = f"-c statement_timeout={int(settings.migrations.apply_timeout_seconds * 1000)}"
    sep = "&" if urlsplit(base).query else "?"
    return f"{base}{sep}application_name=swagger2mcp-ops-alembic&options={quote(options)}"


def alembic_config(settings: OpsSettings, *, output: io.StringIO | None = None) -> Any:
    """An ``alembic.config.Config`` for the app's migration environment, pointed at the target DSN."""
    from alembic.config import Config

    cfg_settings = settings.migrations
    config = Config(
        file_=str(cfg_settings.alembic_config) if cfg_settings.alembic_config else None,
        output_buffer=output,
        stdout=io.StringIO(),
    )
    if cfg_settings.script_location:
        config.set_main_option("script_location", cfg_settings.script_location)
    # ConfigParser interpolation: a literal '%' (URL-encoded password, options) must be doubled.
    config.set_main_option("sqlalchemy.url", _alembic_url(settings).replace("%", "%%"))
    return config


def script_directory(settings: OpsSettings) -> Any:
    """The app's ``alembic.script.ScriptDirectory`` (its revisions)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(settings))


def resolve_target(script: Any, target: str) -> str:
    """The full revision id ``target`` names (a prefix or a symbolic name is allowed).

    Raises:
        ParameterError: the app's migrations have no such revision.
    """
    from alembic.util import CommandError

    try:
        revision = script.get_revision(target)
    except CommandError as exc:
        raise ParameterError(f"target {target!r} is not a revision of the app's migrations: {exc}") from None
    if revision is None:
        raise ParameterError(f"target {target!r} is not a revision of the app's migrations")
    return str(revision.revision)


def current_revisions(settings: OpsSettings) -> tuple[str, ...]:
    """Current revisions, read through the app's env.py (its version table, its connection setup)."""
    from alembic.runtime.environment import EnvironmentContext

    config = alembic_config(settings)
    script = script_directory(settings)
    heads: list[str] = []

    def read(_rev: Any, context: Any) -> list[Any]:
        heads.extend(context.get_current_heads())
        return []

    with logging_kept(), EnvironmentContext(config, script, fn=read, dont_mutate=True):
        script.run_env()
    return tuple(sorted(heads))


def pending_revisions(script: Any, current: tuple[str, ...], upper: str = "heads") -> list[Any]:
    """Pending revisions up to ``upper`` (a revision id, or every head), from the oldest to the newest.

    A target the database already reached (an ancestor of, or equal to, a current revision) has
    nothing pending: this never plans a downgrade.
    """
    if upper != "heads" and current:
        applied = {r.revision for r in script.iterate_revisions(current, "base")}
        if upper in applied:
            return []
    lower = current if current else None
    revs = list(script.iterate_revisions(upper, lower))
    revs.reverse()
    return revs


def down_revision(rev: Any) -> str | None:
    """A revision's parent, or its parents joined by commas (a merge revision)."""
    down = rev.down_revision
    if isinstance(down, tuple | list):
        return ",".join(down) if down else None
    return down


def offline_sql(settings: OpsSettings, start: str, revision: str) -> str:
    """The SQL ``alembic upgrade start:revision --sql`` emits (nothing touches the database)."""
    from alembic import command

    buffer = io.StringIO()
    config = alembic_config(settings, output=buffer)
    with logging_kept():
        command.upgrade(config, f"{start}:{revision}", sql=True)
    return buffer.getvalue()
