"""Evidence bundles of the runbook's Security Incident: every service's logs, ``pg_stat_activity``,
roles, Redis clients, resource usage, release history and the health report, written to the storage
backend under a timestamped prefix with a sha256 manifest written last; :func:`verify_evidence_bundle`
re-reads and checks every file. Every secret of the settings is masked in what is collected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from tasks import postgres, redisdb
from tasks.errors import CheckFailed, ParameterError
from tasks.runlog import run_logger
from tasks.runtime import Runtime, ServiceStatus
from tasks.secrets import configured_secrets, mask_text, safe_error
from tasks.settings import OpsSettings
from tasks.storage import ObjectNotFound, Storage, open_storage

EVIDENCE_MANIFEST = "manifest.json"


class EvidenceTampered(CheckFailed):
    """An evidence bundle does not match its manifest."""


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

    masked = configured_secrets(settings)
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
            return [row[0] for row in conn.execute(query).fetchall()]

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
