"""Incident response: the runbook's "Emergency Procedures" and the Redis out-of-memory resolution.

- evidence bundles: every service's logs, ``pg_stat_activity``, roles, Redis clients, resource usage,
  release history and the health report, written to the storage backend under a timestamped prefix
  with a sha256 manifest written last; :func:`verify_evidence_bundle` re-reads and checks every file;
- secret rotation: PostgreSQL role passwords (``ALTER ROLE ... PASSWORD`` with a verifier computed by
  libpq, so the clear text never reaches the server's logs), app secrets in a Compose env file (atomic
  rewrite keeping every other line) or a Kubernetes Secret; one confirm-gated function does it all, in
  one database transaction that commits only after the app's secret stores were written;
- Redis key census (SCAN, grouped by name prefix, with BullMQ job counts) and the one confirm-gated
  ``FLUSHDB``;
- data recovery helpers: replica counts recorded before scaling to zero, validation queries;
- outage triage helpers: what changed recently (releases, runtime revisions, migrations).

Generated secrets are never logged, returned or stored in a report: only names and fingerprints
(the first 8 hex digits of their sha256).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel, Field

from tasks import postgres, redisdb
from tasks.commands import run_command
from tasks.errors import CheckFailed, OpsError, ParameterError, SettingsError
from tasks.runlog import run_logger
from tasks.runtime import ChangeRecord, Runtime, ServiceStatus
from tasks.secrets import mask_text
from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, Storage, open_storage

EVIDENCE_MANIFEST = "manifest.json"
FINGERPRINT_CHARS = 8
NO_PREFIX = "(no prefix)"


class RotationRefused(OpsError):
    """The rotation plan has problems (a missing role, env file or Secret); nothing was changed."""


class RotationFailed(OpsError):
    """A rotation step failed; what was already changed was put back (the message says what)."""


class EvidenceTampered(CheckFailed):
    """An evidence bundle does not match its manifest."""


def fingerprint(value: str) -> str:
    """The first 8 hex digits of a secret's sha256: enough to tell two values apart, nothing more."""
    return hashlib.sha256(value.encode()).hexdigest()[:FINGERPRINT_CHARS]


def generate_secret(nbytes: int = 32) -> str:
    """A URL-safe random secret (``secrets.token_urlsafe``): safe in env files, URLs and SQL literals."""
    return secrets.token_urlsafe(nbytes)


def settings_secrets(settings: OpsSettings) -> list[str]:
    """Every secret value the settings hold (DSN and Redis URL with their passwords, keys, tokens)."""
    values: list[str] = []
    for url in (settings.postgres.dsn.get_secret_value(), settings.redis.url.get_secret_value()):
        values.append(url)
        with contextlib.suppress(ValueError):
            if urlsplit(url).password:
                values.append(unquote(urlsplit(url).password or ""))
    for secret in (
        settings.storage.access_key_id,
        settings.storage.secret_access_key,
        settings.runtime.kubernetes.token,
    ):
        if secret is not None:
            values.append(secret.get_secret_value())
    return [v for v in values if v]


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_error(exc: BaseException, settings: OpsSettings, extra: Sequence[str] = ()) -> str:
    """``Type: message`` on one line, every known secret masked."""
    return mask_text(f"{type(exc).__name__}: {_one_line(str(exc))}", [*settings_secrets(settings), *extra])


# --- step timings ---------------------------------------------------------------------------------


@dataclass
class Step:
    """One step of an incident flow: when it started, how long it took, how it ended."""

    name: str
    started_at: datetime
    duration_seconds: float = 0.0
    outcome: Literal["ok", "failed", "skipped", "running"] = "running"
    detail: str = ""

    def as_row(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "duration_s": round(self.duration_seconds, 3),
            "outcome": self.outcome,
            "detail": self.detail,
        }


@dataclass
class StepLog:
    """The steps of a run in order; a failing step is recorded with its (masked) error and re-raised."""

    secrets: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        current = Step(name=name, started_at=datetime.now(UTC))
        self.steps.append(current)
        started = time.monotonic()
        try:
            yield current
        except BaseException as exc:
            current.outcome = "failed"
            current.detail = mask_text(f"{type(exc).__name__}: {_one_line(str(exc))}", self.secrets)
            raise
        finally:
            current.duration_seconds = time.monotonic() - started
        current.outcome = "ok"

    def skip(self, name: str, why: str) -> None:
        self.steps.append(Step(name, datetime.now(UTC), 0.0, "skipped", why))

    def rows(self) -> list[dict[str, Any]]:
        return [s.as_row() for s in self.steps]


# --- evidence bundles -----------------------------------------------------------------------------


class EvidenceFile(BaseModel):
    """One file of an evidence bundle."""

    path: str
    size: int
    sha256: str


class EvidenceManifest(BaseModel):
    """The bundle's manifest: written last, so a bundle without one is unfinished."""

    bundle_id: str
    stack: str
    created_at: datetime
    algorithm: str = "sha256"
    files: list[EvidenceFile] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict, description="evidence that could not be collected")


@dataclass(frozen=True)
class EvidenceBundle:
    """Where a bundle was written, its manifest, and the manifest's own sha256 (kept in the report)."""

    location: str
    prefix: str
    manifest: EvidenceManifest
    manifest_sha256: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.manifest.files)


@dataclass(frozen=True)
class EvidenceVerification:
    """A bundle re-read and compared with its manifest."""

    bundle_id: str
    files_checked: int
    mismatched: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unlisted: tuple[str, ...] = ()
    manifest_mismatch: bool = False

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unlisted or self.manifest_mismatch)

    def summary(self) -> str:
        if self.ok:
            return f"bundle {self.bundle_id}: {self.files_checked} files match their sha256"
        parts = []
        if self.manifest_mismatch:
            parts.append("the manifest differs from the one recorded when the bundle was written")
        if self.mismatched:
            parts.append(f"changed: {', '.join(self.mismatched)}")
        if self.missing:
            parts.append(f"missing: {', '.join(self.missing)}")
        if self.unlisted:
            parts.append(f"not in the manifest: {', '.join(self.unlisted)}")
        return f"bundle {self.bundle_id} does NOT match its manifest: " + "; ".join(parts)


def new_bundle_id(stack: str, now: datetime | None = None) -> str:
    """``<UTC time>-<stack>-<random>``: sorts by time, never collides."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{stack}-{secrets.token_hex(3)}"


def _valid_bundle_path(path: str) -> str:
    if not path or path.startswith("/") or ".." in path.split("/") or path == EVIDENCE_MANIFEST:
        raise ParameterError(f"{path!r} is not a valid evidence file path")
    return path


def write_evidence_bundle(
    storage: Storage,
    prefix: str,
    bundle_id: str,
    stack: str,
    files: Mapping[str, bytes],
    errors: Mapping[str, str] | None = None,
) -> EvidenceBundle:
    """Write each file under ``<prefix>/<bundle_id>/``, then the manifest (sha256 and size of each).

    Raises:
        StorageError: the storage refused a write (no manifest is written: the bundle is unfinished).
    """
    base = f"{prefix.strip('/')}/{bundle_id}"
    entries = []
    for path, data in sorted(files.items()):
        storage.put_bytes(f"{base}/{_valid_bundle_path(path)}", data)
        entries.append(EvidenceFile(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    manifest = EvidenceManifest(
        bundle_id=bundle_id,
        stack=stack,
        created_at=datetime.now(UTC),
        files=entries,
        errors=dict(errors or {}),
    )
    raw = manifest.model_dump_json(indent=2).encode()
    storage.put_bytes(f"{base}/{EVIDENCE_MANIFEST}", raw)
    return EvidenceBundle(storage.location, base, manifest, hashlib.sha256(raw).hexdigest())


def verify_evidence_bundle(
    storage: Storage, prefix: str, bundle_id: str, *, manifest_sha256: str | None = None
) -> EvidenceVerification:
    """Re-read every file of a bundle and compare size and sha256 with its manifest.

    Args:
        manifest_sha256: the manifest's digest recorded when the bundle was written (in the report); when
            given, a replaced manifest is detected too.

    Raises:
        ObjectNotFound: the bundle has no manifest (unfinished, or the id is wrong).
    """
    base = f"{prefix.strip('/')}/{bundle_id}"
    raw = storage.get_bytes(f"{base}/{EVIDENCE_MANIFEST}")
    manifest = EvidenceManifest.model_validate_json(raw)
    mismatched, missing = [], []
    for entry in manifest.files:
        digest = hashlib.sha256()
        size = 0
        try:
            for chunk in storage.iter_chunks(f"{base}/{entry.path}"):
                digest.update(chunk)
                size += len(chunk)
        except ObjectNotFound:
            missing.append(entry.path)
            continue
        if size != entry.size or digest.hexdigest() != entry.sha256:
            mismatched.append(entry.path)
    listed = {entry.path for entry in manifest.files} | {EVIDENCE_MANIFEST}
    present = {item.key[len(base) + 1 :] for item in storage.list(base)}
    return EvidenceVerification(
        bundle_id=bundle_id,
        files_checked=len(manifest.files),
        mismatched=tuple(mismatched),
        missing=tuple(missing),
        unlisted=tuple(sorted(present - listed)),
        manifest_mismatch=manifest_sha256 is not None and hashlib.sha256(raw).hexdigest() != manifest_sha256,
    )


def _json_bytes(value: Any) -> bytes:
    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        if isinstance(obj, datetime):
            return obj.isoformat()
        return str(obj)

    return (json.dumps(value, indent=2, default=default, sort_keys=True) + "\n").encode()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "service"


def collect_evidence(
    settings: OpsSettings, runtime: Runtime, *, log_lines: int
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Gather the evidence; one source failing is recorded as an error and the others are still taken.

    Returns:
        (files by bundle path, errors by evidence name). Known secrets of the settings are masked in
        everything collected.
    """
    from tasks import health, releases

    masked = settings_secrets(settings)
    files: dict[str, bytes] = {}
    errors: dict[str, str] = {}

    def put(path: str, data: bytes) -> None:
        files[path] = mask_text(data.decode("utf-8", errors="replace"), masked).encode()

    def attempt(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:
            errors[name] = safe_error(exc, settings)
            return None

    services: list[ServiceStatus] = attempt("runtime/services", runtime.list_services) or []
    if services or "runtime/services" not in errors:
        put("runtime/services.json", _json_bytes(services))
    names = sorted({s.name for s in services})
    for name in names:
        text = attempt(f"logs/{name}", lambda name=name: runtime.logs(name, tail=log_lines))
        if text is not None:
            put(f"logs/{_safe_name(name)}.log", text.encode())
    usage = attempt("runtime/resource_usage", runtime.resource_usage)
    if usage is not None:
        put("runtime/resource_usage.json", _json_bytes(usage))
    histories = {
        name: attempt(f"runtime/history/{name}", lambda n=name: runtime.history(n)) for name in names
    }
    put("runtime/history.json", _json_bytes({k: v for k, v in histories.items() if v is not None}))
    records = attempt("releases", lambda: releases.ReleaseStore.from_settings(settings).all())
    if records is not None:
        put("releases/releases.json", _json_bytes(records))

    def pg_rows(query: str) -> list[Any]:
        with postgres.connect(settings.postgres, application_name="swagger2mcp-ops-evidence") as conn:
            return [row[0] for row in conn.execute(query).fetchall()]  # type: ignore[arg-type]

    activity = attempt(
        "postgres/pg_stat_activity", lambda: pg_rows("SELECT row_to_json(a) FROM pg_stat_activity a")
    )
    if activity is not None:
        put("postgres/pg_stat_activity.json", _json_bytes(activity))
    roles = attempt(
        "postgres/roles",
        lambda: pg_rows(
            "SELECT json_build_object('role', rolname, 'superuser', rolsuper, 'login', rolcanlogin,"
            " 'createrole', rolcreaterole, 'valid_until', rolvaliduntil) FROM pg_roles ORDER BY rolname"
        ),
    )
    if roles is not None:
        put("postgres/roles.json", _json_bytes(roles))

    def redis_state() -> dict[str, Any]:
        conn = redisdb.client(settings.redis)
        try:
            return {"info": conn.info("all"), "clients": conn.client_list()}
        finally:
            conn.close()

    redis_info = attempt("redis/info", redis_state)
    if redis_info is not None:
        put("redis/info.json", _json_bytes(redis_info))
    report = attempt("health", lambda: health.run_checks(settings).as_runbook())
    if report is not None:
        put("health.json", _json_bytes(report))
    return files, errors


def collect_evidence_bundle(settings: OpsSettings, runtime: Runtime) -> EvidenceBundle:
    """Collect the evidence and write it as one bundle with its manifest to the configured storage."""
    files, errors = collect_evidence(settings, runtime, log_lines=settings.incidents.evidence_log_lines)
    storage = open_storage(settings.storage)
    bundle = write_evidence_bundle(
        storage,
        settings.incidents.evidence_prefix,
        new_bundle_id(settings.stack),
        settings.stack,
        files,
        errors,
    )
    run_logger(__name__).info(
        "evidence bundle %s: %d files, %d bytes, manifest sha256 %s",
        bundle.prefix,
        len(bundle.manifest.files),
        bundle.total_bytes,
        bundle.manifest_sha256,
    )
    return bundle


def verify_bundle(settings: OpsSettings, bundle: EvidenceBundle) -> EvidenceVerification:
    """Re-read a bundle just written from the configured storage and check it against its manifest."""
    return verify_evidence_bundle(
        open_storage(settings.storage),
        settings.incidents.evidence_prefix,
        bundle.manifest.bundle_id,
        manifest_sha256=bundle.manifest_sha256,
    )


# --- env files ------------------------------------------------------------------------------------

_ENV_LINE = re.compile(
    r"^(?P<lead>\s*(?:export\s+)?)(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)(?P<eq>\s*=\s*)(?P<value>.*)$"
)


def _unquote_env(raw: str) -> tuple[str, str]:
    """(value, quote character) of an env file value; an unquoted value loses a trailing comment."""
    raw = raw.rstrip("\r\n")
    stripped = raw.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        return stripped[1:-1], stripped[0]
    return re.sub(r"\s+#.*$", "", stripped), ""


def parse_env(text: str) -> dict[str, str]:
    """``KEY=value`` pairs of an env file (comments and blank lines skipped; the last one wins)."""
    values = {}
    for line in text.splitlines():
        match = _ENV_LINE.match(line)
        if match and not line.lstrip().startswith("#"):
            values[match["key"]] = _unquote_env(match["value"])[0]
    return values


def update_env_text(text: str, updates: Mapping[str, str]) -> str:
    """``text`` with each key of ``updates`` set; every other line (comments, order, quoting) kept.

    A key that appears more than once is set on every line; a key that is absent is appended.
    """
    seen: set[str] = set()
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        match = _ENV_LINE.match(body)
        if match and not body.lstrip().startswith("#") and match["key"] in updates:
            _, quote_char = _unquote_env(match["value"])
            value = updates[match["key"]]
            body = f"{match['lead']}{match['key']}{match['eq']}{quote_char}{value}{quote_char}"
            seen.add(match["key"])
        out.append(body + ending)
    missing = [k for k in updates if k not in seen]
    if missing and out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    out.extend(f"{key}={updates[key]}\n" for key in missing)
    return "".join(out)


def write_file_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename, keeping its mode and owner; fsynced."""
    stat = path.stat()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), stat.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.fchown(out.fileno(), stat.st_uid, stat.st_gid)
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# --- secret stores --------------------------------------------------------------------------------


class EnvFileStore:
    """App secrets as ``KEY=value`` lines of the Compose env file."""

    kind = "compose-env"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._original: str | None = None

    @property
    def location(self) -> str:
        return str(self.path)

    def check(self) -> str | None:
        if not self.path.is_file():
            return f"env file {self.path} does not exist; create it or fix incidents.compose_env_file"
        if not os.access(self.path, os.R_OK | os.W_OK) or not os.access(self.path.parent, os.W_OK):
            return f"env file {self.path} (or its directory) is not writable by this process"
        return None

    def read(self) -> dict[str, str]:
        return parse_env(self.path.read_text(encoding="utf-8"))

    def write(self, updates: Mapping[str, str]) -> str:
        self._original = self.path.read_text(encoding="utf-8")
        write_file_atomically(self.path, update_env_text(self._original, updates))
        return f"rewrote {', '.join(sorted(updates))} in {self.path} (atomic rename)"

    def undo(self) -> None:
        if self._original is not None:
            write_file_atomically(self.path, self._original)


class KubernetesSecretStore:
    """App secrets as keys of a Kubernetes Secret, changed with a JSON merge patch (official client)."""

    kind = "kubernetes-secret"

    def __init__(self, settings: OpsSettings, name: str) -> None:
        from tasks.kubernetes import KubernetesRuntime

        self._runtime = KubernetesRuntime(settings)
        self.namespace = settings.runtime.kubernetes.namespace
        self.name = name
        self._original: dict[str, str | None] | None = None

    @property
    def location(self) -> str:
        return f"secret/{self.name} in namespace {self.namespace}"

    def _read_raw(self) -> dict[str, str]:
        secret = self._runtime.core.read_namespaced_secret(
            self.name, self.namespace, _request_timeout=self._runtime.config.request_timeout_seconds
        )
        return dict(secret.data or {})

    def check(self) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._read_raw()
        except ApiException as exc:
            if exc.status == 404:
                return f"{self.location} does not exist; create it or fix incidents.kubernetes_secret"
            return f"cannot read {self.location}: HTTP {exc.status} {exc.reason}"
        except Exception as exc:
            return f"cannot read {self.location}: {type(exc).__name__}"
        return None

    def read(self) -> dict[str, str]:
        return {k: base64.b64decode(v).decode("utf-8", errors="replace") for k, v in self._read_raw().items()}

    def _patch(self, data: Mapping[str, str | None]) -> None:
        from tasks.kubernetes import MERGE_PATCH

        self._runtime.core.patch_namespaced_secret(
            self.name,
            self.namespace,
            {"data": dict(data)},
            _content_type=MERGE_PATCH,
            _request_timeout=self._runtime.config.request_timeout_seconds,
        )

    def write(self, updates: Mapping[str, str]) -> str:
        raw = self._read_raw()
        self._original = {k: raw.get(k) for k in updates}
        self._patch({k: base64.b64encode(v.encode()).decode() for k, v in updates.items()})
        return f"patched {', '.join(sorted(updates))} in {self.location} (merge patch)"

    def undo(self) -> None:
        if self._original is not None:
            self._patch(self._original)


SecretStore = EnvFileStore | KubernetesSecretStore


def secret_stores(settings: OpsSettings) -> list[SecretStore]:
    """The app-secret stores the settings name: the Compose env file, a Kubernetes Secret, or both.

    The env file is ``incidents.compose_env_file``, else ``runtime.compose.env_file`` when the runtime
    is Compose (the file ``docker compose --env-file`` reads).
    """
    stores: list[SecretStore] = []
    config = settings.incidents
    env_file = config.compose_env_file or settings.runtime.compose.env_file
    if env_file is not None and (config.compose_env_file is not None or settings.runtime.kind == "compose"):
        stores.append(EnvFileStore(Path(env_file)))
    if config.kubernetes_secret:
        stores.append(KubernetesSecretStore(settings, config.kubernetes_secret))
    return stores


# --- rotation -------------------------------------------------------------------------------------


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
            problems.append(f"cannot read pg_roles: {postgres.safe_error(exc, settings.postgres)}")
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
        error = mask_text(
            f"{type(exc).__name__}: {_one_line(str(exc))}", [*generated, *settings_secrets(settings)]
        )
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
    env = {}
    if config.docker_host:
        env["DOCKER_HOST"] = config.docker_host
    if config.docker_config:
        env["DOCKER_CONFIG"] = os.fspath(config.docker_config)
    result = run_command(
        compose_argv("up", "--detach", "--no-deps", "--force-recreate", *services),
        timeout=config.command_timeout_seconds,
        env=env,
    )
    return [ChangeRecord("recreate", s, True, commands=(result.command_line,)) for s in services]


# --- Redis: key census and FLUSHDB ----------------------------------------------------------------


def key_group(key: str, depth: int) -> str:
    """The group of a key name: up to ``depth`` ``:``-separated segments, never the last (the id).

    ``bull:default:123`` -> ``bull:default:*``; ``session:abc`` -> ``session:*``; ``counter`` ->
    ``(no prefix)``.
    """
    parts = key.split(":")
    kept = parts[: min(depth, len(parts) - 1)]
    return ":".join(kept) + ":*" if kept else NO_PREFIX


@dataclass(frozen=True)
class KeyCensus:
    """What a Redis database holds, by key name prefix, and the BullMQ jobs that FLUSHDB would lose."""

    server: str
    db: int
    dbsize: int
    scanned: int
    complete: bool
    groups: tuple[tuple[str, int], ...]
    used_memory: int
    used_memory_human: str
    maxmemory: int
    maxmemory_policy: str
    queues: tuple[Any, ...] = ()
    queue_error: str | None = None
    taken_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def jobs(self) -> int:
        return sum(sum(q.counts.values()) for q in self.queues)


def redis_db_number(settings: OpsSettings) -> int:
    conn = redisdb.client(settings.redis)
    try:
        return int(conn.connection_pool.connection_kwargs.get("db", 0) or 0)
    finally:
        conn.close()


def key_census(settings: OpsSettings, *, depth: int | None = None, max_keys: int | None = None) -> KeyCensus:
    """Count the keys of the configured Redis db by prefix (SCAN with COUNT; never KEYS), plus job counts.

    Raises:
        redis.RedisError: Redis cannot be reached.
    """
    from tasks import queues

    config = settings.incidents
    depth = depth or config.key_census_depth
    limit = max_keys or config.key_census_max_keys
    conn = redisdb.client(settings.redis)
    try:
        db = int(conn.connection_pool.connection_kwargs.get("db", 0) or 0)
        dbsize = int(conn.dbsize())
        memory = conn.info("memory")
        groups: Counter[str] = Counter()
        scanned = 0
        for raw in conn.scan_iter(count=config.scan_count):
            name = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else str(raw)
            groups[key_group(name, depth)] += 1
            scanned += 1
            if scanned >= limit:
                break
    finally:
        conn.close()
    counts: list[Any] = []
    queue_error = None
    try:
        counts = queues.queue_counts(settings.redis, settings.queue)
    except Exception as exc:
        queue_error = redisdb.safe_error(exc, settings.redis)
    return KeyCensus(
        server=settings.redis.masked_url,
        db=db,
        dbsize=dbsize,
        scanned=scanned,
        complete=scanned < limit,
        groups=tuple(sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))),
        used_memory=int(memory.get("used_memory", 0)),
        used_memory_human=str(memory.get("used_memory_human", "")),
        maxmemory=int(memory.get("maxmemory", 0)),
        maxmemory_policy=str(memory.get("maxmemory_policy", "unknown")),
        queues=tuple(counts),
        queue_error=queue_error,
    )


@dataclass(frozen=True)
class FlushRecord:
    """The change record of a FLUSHDB (or of its dry run)."""

    dry_run: bool
    server: str
    db: int
    keys_before: int
    keys_after: int
    command: str
    duration_seconds: float

    @property
    def changed(self) -> bool:
        return not self.dry_run and self.keys_before != self.keys_after


def flush_redis_db(settings: OpsSettings, census: KeyCensus, *, confirm: bool) -> FlushRecord:
    """The one gate for ``FLUSHDB``: without ``confirm`` nothing is deleted and the census is the plan.

    Only the db the census was taken of is flushed (never ``FLUSHALL``); a settings change in between
    (another db number) refuses.

    Raises:
        ParameterError: the configured db is not the one the census (and the approval) showed.
        redis.RedisError: Redis cannot be reached or refused the command.
    """
    started = time.monotonic()
    command = f"FLUSHDB (db {census.db} on {census.server})"
    conn = redisdb.client(settings.redis)
    try:
        db = int(conn.connection_pool.connection_kwargs.get("db", 0) or 0)
        if db != census.db:
            raise ParameterError(
                f"the census was of db {census.db}, the settings now name db {db}; nothing was flushed."
                " Run again to see what the current db holds"
            )
        before = int(conn.dbsize())
        if not confirm:
            return FlushRecord(True, census.server, db, before, before, command, 0.0)
        run_logger(__name__).warning("FLUSHDB on db %s of %s: %s keys", db, census.server, before)
        conn.flushdb()
        after = int(conn.dbsize())
    finally:
        conn.close()
    return FlushRecord(False, census.server, db, before, after, command, round(time.monotonic() - started, 3))


# --- data recovery --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaCount:
    """A service's replicas before it was scaled to zero: what it is scaled back to."""

    service: str
    replicas: int
    image: str | None
    state: str


def record_replicas(runtime: Runtime, services: Sequence[str]) -> list[ReplicaCount]:
    """The replica counts of ``services`` now (a service the runtime does not have is left out).

    Raises:
        ParameterError: none of the services exists in the runtime (nothing could stop the writes).
    """
    statuses = {s.name: s for s in runtime.list_services()}
    recorded = [
        ReplicaCount(name, statuses[name].desired, statuses[name].image, statuses[name].state)
        for name in services
        if name in statuses and statuses[name].state != "missing"
    ]
    if not recorded:
        raise ParameterError(
            f"none of {', '.join(services)} runs in the {runtime.kind!r} runtime, so writes cannot be"
            " stopped by scaling; stop the application yourself and pass stop_writes=false, or configure"
            " OPS_RUNTIME__KIND. Nothing was done"
        )
    return recorded


def scale_services(runtime: Runtime, targets: Mapping[str, int]) -> list[ChangeRecord]:
    """Scale each service to its count, in order (all are tried; the first error is raised after)."""
    records: list[ChangeRecord] = []
    first_error: BaseException | None = None
    for service, replicas in targets.items():
        try:
            records.append(runtime.scale(service, replicas))
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return records


@dataclass(frozen=True)
class ValidationResult:
    """One validation query after a recovery."""

    query: str
    ok: bool
    value: str | None
    error: str | None
    duration_ms: float


def run_validation_queries(settings: OpsSettings, queries: Sequence[str]) -> list[ValidationResult]:
    """Run each query in a read-only transaction under its own timeout.

    A query passes when it returns a row whose first column is not false, NULL or 0
    (``SELECT count(*) > 0 FROM users``, ``SELECT NOT EXISTS (SELECT ... orphans)``).
    """
    results = []
    timeout_ms = int(settings.incidents.validation_timeout_seconds * 1000)
    for query in queries:
        started = time.perf_counter()
        try:
            with postgres.connect(
                settings.postgres, autocommit=False, application_name="swagger2mcp-ops-validate"
            ) as conn:
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
                row = conn.execute(query).fetchone()  # type: ignore[arg-type]
                conn.rollback()
        except psycopg.Error as exc:
            results.append(
                ValidationResult(
                    query, False, None, postgres.safe_error(exc, settings.postgres), _ms(started)
                )
            )
            continue
        value = None if row is None else row[0]
        ok = row is not None and value is not None and value is not False and value != 0
        error = None if ok else f"returned {'no row' if row is None else repr(value)}; expected a true value"
        results.append(
            ValidationResult(query, ok, None if value is None else str(value)[:200], error, _ms(started))
        )
    return results


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


# --- outage triage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecentChange:
    """Something that changed recently: a release, a runtime revision, a migration."""

    kind: str
    what: str
    at: datetime | None
    detail: str = ""

    def as_row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "what": self.what,
            "at": self.at.isoformat(timespec="seconds") if self.at else "",
            "detail": self.detail,
        }


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def recent_changes(
    records: Sequence[Any],
    histories: Mapping[str, Sequence[Any]],
    migration_runs: Sequence[RecentChange],
    *,
    window: timedelta,
    now: datetime,
) -> list[RecentChange]:
    """Releases (deploys and rollbacks), runtime revisions and migrations within ``window`` of ``now``."""
    since = now - window
    changes = []
    for record in records:
        created = _aware(record.created_at)
        if record.kind in {"deploy", "rollback"} and created is not None and created >= since:
            images = ", ".join(f"{s}={i}" for s, i in sorted(record.images.items()))
            changes.append(
                RecentChange(
                    "release",
                    record.id,
                    created,
                    f"{record.kind} {record.status}: {images}; migration {record.migration_revision or '-'}",
                )
            )
    recorded_release_ids = {r.id for r in records}
    for service, revisions in histories.items():
        for revision in revisions:
            created = _aware(revision.created_at)
            # Compose history is the release records themselves: do not count them twice.
            if revision.revision in recorded_release_ids or created is None or created < since:
                continue
            changes.append(
                RecentChange(
                    "revision",
                    f"{service} revision {revision.revision}",
                    created,
                    ", ".join(revision.images.values()) + (" (current)" if revision.current else ""),
                )
            )
    changes += [m for m in migration_runs if m.at is not None and m.at >= since]
    return sorted(changes, key=lambda c: c.at or now, reverse=True)


def recent_migration_runs(settings: OpsSettings, *, window: timedelta) -> list[RecentChange]:
    """Migration runs recorded by migrate-database within ``window`` (none when the table is absent)."""
    table = f'"{settings.migrations.runs_schema}"."migration_runs"'
    with postgres.connect(settings.postgres, application_name="swagger2mcp-ops-triage") as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if not exists or not exists[0]:
            return []
        rows = conn.execute(
            sql.SQL(
                "SELECT id::text, status, started_at, array_to_string(from_revisions, ','),"
                " array_to_string(to_revisions, ',') FROM {}.{} WHERE started_at >= now() - %s"
                " ORDER BY started_at DESC"
            ).format(sql.Identifier(settings.migrations.runs_schema), sql.Identifier("migration_runs")),
            (window,),
        ).fetchall()
    return [
        RecentChange(
            "migration", f"migration run {r[0]}", _aware(r[2]), f"{r[1]}: {r[3] or '-'} -> {r[4] or '-'}"
        )
        for r in rows
    ]


@dataclass(frozen=True)
class RollbackProposal:
    """Why a rollback is proposed, from what to what."""

    reason: str
    recent: tuple[RecentChange, ...]
    current_images: dict[str, str]
    target_release: str | None
    target_images: dict[str, str]

    def describe(self) -> str:
        lines = [self.reason, ""]
        lines += [
            f"- {c.kind} {c.what} at {c.at:%Y-%m-%d %H:%M:%S}Z: {c.detail}" for c in self.recent if c.at
        ]
        now = ", ".join(f"{s}={i}" for s, i in sorted(self.current_images.items())) or "unknown"
        lines += ["", f"Running now: {now}."]
        if self.target_release:
            back = ", ".join(f"{s}={i}" for s, i in sorted(self.target_images.items()))
            lines.append(f"rollback-release would return to release {self.target_release}: {back}.")
        else:
            lines.append("rollback-release would undo each service to its previous runtime revision.")
        return "\n".join(lines)


def propose_rollback(
    changes: Sequence[RecentChange],
    *,
    healthy: bool,
    services: Sequence[ServiceStatus],
    previous_good: Any | None,
    propose_when_healthy: bool = False,
) -> RollbackProposal | None:
    """A rollback proposal when a release (or runtime revision) is recent and the stack is not healthy."""
    recent = [c for c in changes if c.kind in {"release", "revision"}]
    if not recent or (healthy and not propose_when_healthy):
        return None
    newest = recent[0]
    state = "the stack is healthy (proposal asked for anyway)" if healthy else "the stack is not healthy"
    return RollbackProposal(
        reason=(
            f"{state} and {len(recent)} change(s) were released within the window, the newest"
            f" {newest.what} at {newest.at:%H:%M:%S}Z."
        ),
        recent=tuple(recent),
        current_images={s.name: s.image for s in services if s.image},
        target_release=previous_good.id if previous_good is not None else None,
        target_images=dict(previous_good.images) if previous_good is not None else {},
    )


def require_settings(settings: OpsSettings) -> None:
    """Settings errors the incident flows check before any side effect."""
    for query in settings.incidents.validation_queries:
        if not query.strip():
            raise SettingsError("incidents.validation_queries holds an empty query; remove it")


# --- Prefect task wrappers ------------------------------------------------------------------------

collect_evidence_task = task(
    collect_evidence_bundle, name="collect-evidence", cache_policy=NO_CACHE, retries=1
)
verify_evidence_task = task(verify_bundle, name="verify-evidence-bundle", cache_policy=NO_CACHE)
plan_rotation_task = task(plan_rotation, name="plan-secret-rotation", cache_policy=NO_CACHE)
# No retries: a rotation is all-or-nothing and its failure says what was put back.
rotate_secrets_task = task(rotate_secrets, name="rotate-secrets", cache_policy=NO_CACHE)
restart_for_new_config_task = task(
    restart_for_new_config, name="restart-for-new-secrets", cache_policy=NO_CACHE
)
key_census_task = task(key_census, name="redis-key-census", cache_policy=NO_CACHE)
flush_redis_db_task = task(flush_redis_db, name="flush-redis-db", cache_policy=NO_CACHE)
record_replicas_task = task(record_replicas, name="record-replicas", cache_policy=NO_CACHE)
scale_services_task = task(scale_services, name="scale-services", cache_policy=NO_CACHE, retries=1)
validation_queries_task = task(run_validation_queries, name="run-validation-queries", cache_policy=NO_CACHE)


# --- runtime reads the flows share ----------------------------------------------------------------


def service_statuses(runtime: Runtime) -> list[ServiceStatus]:
    """Every service's status (``docker compose ps`` / ``kubectl get deployments``)."""
    return runtime.list_services()


def service_histories(runtime: Runtime, services: Sequence[str]) -> dict[str, list[Any]]:
    """Each service's rollout history (ReplicaSet revisions, or the recorded releases on Compose)."""
    return {service: runtime.history(service) for service in services}


def wait_services_ready(runtime: Runtime, services: Sequence[str], timeout: float) -> list[ServiceStatus]:
    """Wait until the services are ready (nothing to wait for when the list is empty)."""
    return runtime.wait_ready(list(services), timeout) if services else []


def restart_services(runtime: Runtime, services: Sequence[str]) -> list[ChangeRecord]:
    """``docker compose restart`` / ``kubectl rollout restart`` the services."""
    return runtime.restart(list(services))


def health_report(settings: OpsSettings) -> Any:
    """The health report (PostgreSQL, Redis, queues, the app's endpoints), as health-check makes it."""
    from tasks import health

    return health.run_checks(settings)


service_statuses_task = task(service_statuses, name="list-services", cache_policy=NO_CACHE, retries=1)
service_histories_task = task(service_histories, name="rollout-history", cache_policy=NO_CACHE)
wait_services_ready_task = task(wait_services_ready, name="wait-services-ready", cache_policy=NO_CACHE)
restart_services_task = task(restart_services, name="restart-services", cache_policy=NO_CACHE)
health_report_task = task(health_report, name="health-checks", cache_policy=NO_CACHE)
