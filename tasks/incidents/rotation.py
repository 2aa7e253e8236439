"""Secret rotation: PostgreSQL role passwords (``ALTER ROLE ... PASSWORD`` with a SCRAM verifier
computed by libpq, so the clear text never reaches the server's logs) and the application's secrets in
its secret stores. One confirm-gated function does it all, in one database transaction that commits
only after the stores were written.

Generated secrets are never logged, returned or stored in a report: only names and fingerprints
(the first 8 hex digits of their sha256).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from tasks import postgres
from tasks.commands import run_command
from tasks.errors import OpsError, ParameterError
from tasks.incidents.stores import SecretStore, secret_stores
from tasks.runlog import run_logger
from tasks.runtime import ChangeRecord, Runtime
from tasks.secrets import safe_error
from tasks.settings import OpsSettings

FINGERPRINT_CHARS = 8


class RotationRefused(OpsError):
    """The rotation plan has problems (a missing role, env file or Secret); nothing was changed."""


class RotationFailed(OpsError):
    """A rotation step failed; what was already changed was put back (the message says what)."""


def fingerprint(value: str) -> str:
    """The first 8 hex digits of a secret's sha256: enough to tell two values apart, nothing more."""
    return hashlib.sha256(value.encode()).hexdigest()[:FINGERPRINT_CHARS]


def generate_secret(nbytes: int = 32) -> str:
    """A URL-safe random secret (``secrets.token_urlsafe``): safe in env files, URLs and SQL literals."""
    return secrets.token_urlsafe(nbytes)


@dataclass(frozen=True)
class RotationTarget:
    """One secret a rotation replaces: a role's password, an app secret, or a key carrying a password."""

    kind: Literal["postgres-role", "app-secret", "role-carrier"]
    name: str
    location: str
    role: str | None = None

    def describe(self) -> str:
        if self.kind == "postgres-role":
            return f"password of PostgreSQL role {self.name} ({self.location})"
        if self.kind == "role-carrier":
            return f"{self.name} in {self.location} (carries role {self.role}'s password)"
        return f"{self.name} in {self.location} (new random value)"


@dataclass(frozen=True)
class RotationPlan:
    """What a rotation would replace, and the problems that forbid it (checked before anything)."""

    targets: tuple[RotationTarget, ...]
    problems: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.targets


@dataclass(frozen=True)
class RotatedSecret:
    """A replaced secret as reports show it: never the value, only fingerprints."""

    kind: str
    name: str
    location: str
    old_fingerprint: str | None
    new_fingerprint: str | None
    outcome: str

    def as_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RotationRecord:
    """The change record of a rotation (or of its dry run)."""

    dry_run: bool
    secrets: tuple[RotatedSecret, ...]
    commands: tuple[str, ...]
    duration_seconds: float

    @property
    def changed(self) -> bool:
        return any(s.outcome == "rotated" for s in self.secrets)


def _dsn_user(settings: OpsSettings) -> str | None:
    return urlsplit(settings.postgres.dsn.get_secret_value()).username


def plan_rotation(settings: OpsSettings, *, only: Sequence[str] | None = None) -> RotationPlan:
    """The secrets the settings name (or the ``only`` subset), and every reason rotation cannot run.

    Reads only: roles in ``pg_roles``, the secret stores' keys.

    Raises:
        ParameterError: ``only`` names something the settings do not.
    """
    config = settings.incidents
    known = set(config.rotate_roles) | set(config.app_secrets)
    if only is not None:
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ParameterError(
                f"cannot rotate {', '.join(unknown)}: not in incidents.rotate_roles or incidents.app_secrets"
                f" ({', '.join(sorted(known)) or 'both empty'}); nothing was done"
            )
    chosen = set(only) if only is not None else known
    roles = [r for r in config.rotate_roles if r in chosen]
    apps = [k for k in config.app_secrets if k in chosen]
    problems: list[str] = []
    stores = secret_stores(settings)
    carriers = [(role, key) for role in roles for key in config.role_secret_keys.get(role, [])]
    if (apps or carriers) and not stores:
        problems.append(
            "app secrets are named but no store is configured: set incidents.compose_env_file (Compose) or"
            " incidents.kubernetes_secret (Kubernetes)"
        )
    server = f"{urlsplit(settings.postgres.dsn.get_secret_value()).hostname}"
    targets = [RotationTarget("postgres-role", role, f"PostgreSQL at {server}") for role in roles]
    if not stores:
        targets += [RotationTarget("app-secret", key, "(no store configured)") for key in apps]
    if roles:
        if _dsn_user(settings) in roles:
            problems.append(
                f"OPS_POSTGRES__DSN connects as {_dsn_user(settings)!r}, a role to rotate: this tool would"
                " lock itself out; connect as an administrative role (CREATEROLE) instead"
            )
        try:
            with postgres.connect(settings.postgres, application_name="swagger2mcp-ops-rotation") as conn:
                present = {
                    r[0]
                    for r in conn.execute(
                        "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (roles,)
                    ).fetchall()
                }
        except psycopg.Error as exc:
            present = set(roles)
            problems.append(f"cannot read pg_roles: {safe_error(exc, settings.postgres)}")
        problems += [f"PostgreSQL role {r!r} does not exist" for r in roles if r not in present]
    for store in stores:
        problem = store.check()
        if problem:
            problems.append(problem)
            continue
        existing = store.read()
        targets += [RotationTarget("app-secret", key, store.location) for key in apps]
        for role, key in carriers:
            targets.append(RotationTarget("role-carrier", key, store.location, role))
            if key not in existing:
                problems.append(f"{key} (carrier of role {role}'s password) is not in {store.location}")
    return RotationPlan(tuple(targets), tuple(problems))


def carry_password(current: str, role: str, password: str) -> str:
    """The new value of a key carrying ``role``'s password: a URL's password replaced, else the password.

    ``postgresql://app:old@db:5432/app`` becomes ``postgresql://app:<new>@db:5432/app``; a URL for
    another user is left alone only if it has no password for ``role`` (then the password is set whole).
    """
    with contextlib.suppress(ValueError):
        parts = urlsplit(current)
        if parts.scheme and parts.netloc and "@" in parts.netloc and unquote(parts.username or "") == role:
            host = parts.netloc.rsplit("@", 1)[1]
            netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"
            return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return password


def rotate_secrets(settings: OpsSettings, plan: RotationPlan, *, confirm: bool) -> RotationRecord:
    """The one gate for rotating secrets: without ``confirm`` it lists what it would replace.

    With ``confirm``: new values from :func:`generate_secret`; the app-secret stores are written; each
    role's password is changed with ``ALTER ROLE ... PASSWORD '<SCRAM verifier>'`` (libpq's
    ``PQencryptPasswordConn``, so the clear text never reaches the server or its logs) inside one
    transaction, committed last. Any failure before the commit rolls the transaction back and puts the
    stores already written back, so roles and app secrets never disagree.

    Returns:
        The change record: names, locations and fingerprints (never values) and the masked commands.

    Raises:
        RotationRefused: the plan has problems; nothing was changed.
        RotationFailed: a step failed; the message says what was put back.
    """
    started = time.monotonic()
    if not confirm:
        return RotationRecord(
            dry_run=True,
            secrets=tuple(
                RotatedSecret(t.kind, t.name, t.location, None, None, "would rotate") for t in plan.targets
            ),
            commands=(),
            duration_seconds=0.0,
        )
    if plan.problems:
        raise RotationRefused("rotation refused, nothing was changed: " + "; ".join(plan.problems))
    logger = run_logger(__name__)
    nbytes = settings.incidents.secret_bytes
    roles = [t.name for t in plan.targets if t.kind == "postgres-role"]
    passwords = {role: generate_secret(nbytes) for role in roles}
    generated = list(passwords.values())
    stores = {store.location: store for store in secret_stores(settings)}
    updates: dict[str, dict[str, str]] = {}
    old_values: dict[tuple[str, str], str | None] = {}
    for target in plan.targets:
        if target.kind == "postgres-role":
            continue
        current = stores[target.location].read()
        old_values[(target.location, target.name)] = current.get(target.name)
        if target.kind == "app-secret":
            value = generate_secret(nbytes)
        else:
            assert target.role is not None
            value = carry_password(current.get(target.name, ""), target.role, passwords[target.role])
        generated.append(value)
        updates.setdefault(target.location, {})[target.name] = value
    commands: list[str] = []
    written: list[SecretStore] = []
    conn = postgres.connect(settings.postgres, autocommit=False, application_name="swagger2mcp-ops-rotation")
    try:
        # Stores first, roles inside the open transaction, commit last: any failure before the commit
        # leaves the roles as they were, and the stores written so far are put back.
        for location, values in updates.items():
            store = stores[location]
            written.append(store)
            commands.append(store.write(values))
        for role, password in passwords.items():
            verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), None).decode()
            conn.execute(
                sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier))
            )
            commands.append(f"ALTER ROLE {role} WITH PASSWORD '***' (SCRAM verifier)")
        conn.commit()
    except BaseException as exc:
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
        undone, failed_undo = [], []
        for store in reversed(written):
            try:
                store.undo()
                undone.append(store.location)
            except Exception:
                failed_undo.append(store.location)
        error = safe_error(exc, settings, generated)
        back = "role passwords unchanged (transaction rolled back)"
        if undone:
            back += f"; restored {', '.join(undone)}"
        if failed_undo:
            back += f"; COULD NOT restore {', '.join(failed_undo)}: check them by hand"
        if isinstance(exc, Exception):
            raise RotationFailed(f"secret rotation failed: {error}; {back}") from None
        raise
    finally:
        conn.close()
    logger.info("rotated %d secrets (%s)", len(plan.targets), ", ".join(t.name for t in plan.targets))
    rotated = []
    for target in plan.targets:
        if target.kind == "postgres-role":
            new = fingerprint(passwords[target.name])
            old = None
        else:
            new = fingerprint(updates[target.location][target.name])
            previous = old_values.get((target.location, target.name))
            old = fingerprint(previous) if previous else None
        rotated.append(RotatedSecret(target.kind, target.name, target.location, old, new, "rotated"))
    return RotationRecord(
        dry_run=False,
        secrets=tuple(rotated),
        commands=tuple(commands),
        duration_seconds=round(time.monotonic() - started, 3),
    )


def restart_for_new_config(
    settings: OpsSettings, runtime: Runtime, services: Sequence[str]
) -> list[ChangeRecord]:
    """Restart services so they read rotated secrets.

    A Kubernetes rollout restart starts new pods, which read the Secret again. ``docker compose
    restart`` keeps a container's environment: Compose services are recreated
    (``up --detach --no-deps --force-recreate``) so they get the new env file values.
    """
    compose_argv = getattr(runtime, "compose_argv", None)
    if not callable(compose_argv):
        return runtime.restart(list(services))
    config = settings.runtime.compose
    result = run_command(
        compose_argv("up", "--detach", "--no-deps", "--force-recreate", *services),
        timeout=config.command_timeout_seconds,
        env=config.docker_env(),
    )
    return [ChangeRecord("recreate", s, True, commands=(result.command_line,)) for s in services]
