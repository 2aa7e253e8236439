"""Host checks: disk space of the uploads root, file storage and configured paths; the uploads
directory's permissions (runbook Common Issues 6); TCP reachability of PostgreSQL and Redis and DNS of
the configured hosts (Performance "Network Issues")."""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import shutil
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.diagnose.deadline import with_deadline
from tasks.diagnose.model import (
    FLOW_CLEANUP_UPLOADS,
    FLOW_RESTART,
    RB_DATABASE,
    RB_NETWORK,
    RB_REDIS,
    RB_UPLOADS,
    Diagnosis,
    Finding,
    Severity,
)
from tasks.settings import DiagnoseSettings, OpsSettings

# --- Disk space ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskSpace:
    path: str
    checked: str  # the nearest existing ancestor actually measured
    total: int
    free: int

    @property
    def free_ratio(self) -> float:
        return self.free / self.total if self.total else 0.0


@dataclass(frozen=True)
class DiskEvidence:
    disks: tuple[DiskSpace, ...]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "path": d.path,
                "measured_at": d.checked,
                "size_gib": round(d.total / 2**30, 2),
                "free_gib": round(d.free / 2**30, 2),
                "free": f"{d.free_ratio:.0%}",
            }
            for d in self.disks
        ]


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_paths(settings: OpsSettings) -> list[Path]:
    """The paths whose filesystems are checked: uploads root, file storage, configured extras."""
    paths = [settings.uploads.root]
    storage = urlsplit(settings.storage.url)
    if storage.scheme == "file":
        paths.append(Path(storage.netloc + storage.path))
    paths += settings.diagnose.disk_paths
    return paths


def disk_space(paths: Sequence[Path], limits: DiagnoseSettings) -> Diagnosis:
    """Runbook 6 "Check disk space" (``df -h``) for each path's filesystem, once per filesystem."""
    check, title = "disk", "Disk space"
    seen: set[int] = set()
    disks: list[DiskSpace] = []
    for path in paths:
        measured = _existing(Path(path))
        device = measured.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        usage = shutil.disk_usage(measured)
        disks.append(DiskSpace(str(path), str(measured), usage.total, usage.free))
    evidence = DiskEvidence(tuple(disks))
    return Diagnosis(check, title, evidence, tuple(disk_findings(evidence, limits)))


def disk_findings(evidence: DiskEvidence, limits: DiagnoseSettings) -> list[Finding]:
    check = "disk"
    findings = []
    for d in evidence.disks:
        summary = f"{d.path}: {d.free_ratio:.0%} free ({d.free / 2**30:.1f} GiB of {d.total / 2**30:.1f} GiB)"
        resolution = "Clean up old uploads if the disk is full (dry run first); prune old backups"
        if d.free_ratio <= limits.disk_free_critical_ratio:
            findings.append(
                Finding(check, Severity.CRITICAL, summary, RB_UPLOADS, resolution, FLOW_CLEANUP_UPLOADS)
            )
        elif d.free_ratio <= limits.disk_free_warn_ratio:
            findings.append(
                Finding(check, Severity.WARNING, summary, RB_UPLOADS, resolution, FLOW_CLEANUP_UPLOADS)
            )
    if not findings:
        findings.append(
            Finding(
                check,
                Severity.OK,
                "; ".join(f"{d.path} {d.free_ratio:.0%} free" for d in evidence.disks),
                RB_UPLOADS,
            )
        )
    return findings


# --- Uploads directory: owner, mode, first entries ----------------------------------------------


@dataclass(frozen=True)
class PathEntry:
    name: str
    kind: str
    mode: str
    owner: str
    group: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class UploadsEvidence:
    """``ls -la`` of the uploads root: the root's own mode and owner, and its first entries."""

    root: str
    exists: bool
    entry: PathEntry | None
    writable_by_us: bool
    entries: tuple[PathEntry, ...] = ()
    entry_count: int = 0

    def rows(self) -> list[dict[str, Any]]:
        shown = ([self.entry] if self.entry else []) + list(self.entries)
        return [
            {
                "name": "." if e is self.entry else e.name,
                "type": e.kind,
                "mode": e.mode,
                "owner": e.owner,
                "group": e.group,
                "size": e.size,
                "modified": e.modified.isoformat(timespec="seconds"),
            }
            for e in shown
        ]


def _name_of(lookup: Callable[[int], Any], ident: int) -> str:
    try:
        return str(lookup(ident)[0])
    except KeyError:
        return str(ident)


def _path_entry(path: Path, name: str) -> PathEntry:
    st = path.lstat()
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
    return PathEntry(
        name=name,
        kind=kind,
        mode=stat.filemode(st.st_mode) + f" ({stat.S_IMODE(st.st_mode):04o})",
        owner=_name_of(pwd.getpwuid, st.st_uid),
        group=_name_of(grp.getgrgid, st.st_gid),
        size=st.st_size,
        modified=datetime.fromtimestamp(st.st_mtime, UTC),
    )


def _first_entries(directory: Path, shown: int) -> tuple[list[PathEntry], int]:
    """The first ``shown`` entries of ``directory`` (in scan order) and how many it holds."""
    entries: list[PathEntry] = []
    count = 0
    with os.scandir(directory) as it:
        for item in it:
            count += 1
            if len(entries) < shown:
                entries.append(_path_entry(Path(item.path), item.name))
    return entries, count


def uploads_permissions(settings: OpsSettings, shown: int = 20) -> Diagnosis:
    """Runbook 6 "Check uploads directory permissions" (``ls -la backend/uploads/``)."""
    check, title = "uploads-permissions", "Uploads directory"
    root = settings.uploads.root
    if not root.exists():
        evidence = UploadsEvidence(str(root), False, None, False)
        finding = Finding(
            check,
            Severity.CRITICAL,
            f"uploads directory {root} does not exist: uploads fail with 'Cannot save file'",
            RB_UPLOADS,
            "Create it, owned by the user the backend runs as, and mount it where the backend expects it",
            None,
        )
        return Diagnosis(check, title, evidence, (finding,))
    entry = _path_entry(root, str(root))
    entries, count = _first_entries(root, shown) if root.is_dir() else ([], 0)
    evidence = UploadsEvidence(
        str(root),
        True,
        entry,
        os.access(root, os.W_OK | os.X_OK),
        tuple(sorted(entries, key=lambda e: e.name)),
        count,
    )
    return Diagnosis(check, title, evidence, tuple(uploads_findings(evidence, root, settings)))


def uploads_findings(evidence: UploadsEvidence, root: Path, settings: OpsSettings) -> list[Finding]:
    check = "uploads-permissions"
    findings: list[Finding] = []
    st = root.stat()
    mode = stat.S_IMODE(st.st_mode)
    owner = evidence.entry.owner if evidence.entry else "?"
    fix = "chown/chmod the uploads directory to the user the backend runs as"
    if not stat.S_ISDIR(st.st_mode):
        return [Finding(check, Severity.CRITICAL, f"{root} is not a directory", RB_UPLOADS, fix, None)]
    expected_owner = settings.uploads.expected_owner
    if expected_owner is not None and owner != expected_owner:
        findings.append(
            Finding(
                check,
                Severity.CRITICAL,
                f"{root} is owned by {owner}, expected {expected_owner}: the backend may not write there",
                RB_UPLOADS,
                fix,
                None,
            )
        )
    expected_mode = settings.uploads.expected_mode
    if expected_mode is not None and mode != int(expected_mode, 8):
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"{root} has mode {mode:04o}, expected {int(expected_mode, 8):04o}",
                RB_UPLOADS,
                fix,
                None,
            )
        )
    if not mode & stat.S_IWUSR:
        findings.append(
            Finding(
                check,
                Severity.CRITICAL,
                f"{root} is not writable by its owner ({mode:04o})",
                RB_UPLOADS,
                fix,
                None,
            )
        )
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"{root} is world-writable ({mode:04o}): anyone on the host can replace uploads",
                RB_UPLOADS,
                fix,
                None,
            )
        )
    if not findings:
        findings.append(
            Finding(
                check,
                Severity.OK,
                f"{root}: mode {mode:04o}, owner {owner}, {evidence.entry_count} entries",
                RB_UPLOADS,
            )
        )
    return findings


# --- Network: TCP reachability and DNS -------------------------------------------------------------


@dataclass(frozen=True)
class TcpProbe:
    name: str
    host: str
    port: int
    ok: bool
    latency_ms: float | None
    error: str | None = None


@dataclass(frozen=True)
class DnsLookup:
    host: str
    addresses: tuple[str, ...]
    latency_ms: float | None
    error: str | None = None


@dataclass(frozen=True)
class NetworkEvidence:
    tcp: tuple[TcpProbe, ...]
    dns: tuple[DnsLookup, ...]

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {
                "kind": "tcp",
                "target": f"{p.name} {p.host}:{p.port}",
                "ok": p.ok,
                "latency_ms": p.latency_ms,
                "result": p.error or "connected",
            }
            for p in self.tcp
        ]
        rows += [
            {
                "kind": "dns",
                "target": d.host,
                "ok": d.error is None,
                "latency_ms": d.latency_ms,
                "result": d.error or ", ".join(d.addresses),
            }
            for d in self.dns
        ]
        return rows


def probe_tcp(name: str, host: str, port: int, timeout: float) -> TcpProbe:
    """``nc -zv host port``: open and close one TCP connection."""
    started = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return TcpProbe(name, host, port, False, None, f"{type(exc).__name__}: {exc}")
    return TcpProbe(name, host, port, True, round((time.perf_counter() - started) * 1000, 2))


def resolve(host: str, timeout: float) -> DnsLookup:
    """DNS resolution of ``host`` (IP literals answer themselves)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return DnsLookup(host, (host,), 0.0)
    started = time.perf_counter()
    try:
        infos = with_deadline(lambda: socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP), timeout)
    except (OSError, TimeoutError, UnicodeError) as exc:
        return DnsLookup(host, (), None, f"{type(exc).__name__}: {exc}")
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    return DnsLookup(host, addresses, round((time.perf_counter() - started) * 1000, 2))


def network_targets(settings: OpsSettings) -> tuple[list[tuple[str, str, int]], list[str]]:
    """TCP targets (PostgreSQL, Redis) and host names to resolve, from the settings."""
    tcp: list[tuple[str, str, int]] = []
    hosts: list[str] = []
    pg = urlsplit(settings.postgres.dsn.get_secret_value())
    if pg.hostname and not pg.hostname.startswith("/"):
        tcp.append(("postgres", pg.hostname, pg.port or 5432))
        hosts.append(pg.hostname)
    rd = urlsplit(settings.redis.url.get_secret_value())
    if rd.scheme in {"redis", "rediss"} and rd.hostname:
        tcp.append(("redis", rd.hostname, rd.port or 6379))
        hosts.append(rd.hostname)
    for url in settings.health.urls:
        host = urlsplit(url).hostname
        if host:
            hosts.append(host)
    hosts += settings.diagnose.resolve_hosts
    return tcp, list(dict.fromkeys(hosts))


def network(settings: OpsSettings) -> Diagnosis:
    """Performance "Network Issues": TCP reachability of PostgreSQL and Redis, DNS of configured hosts."""
    check, title = "network", "Reachability and DNS"
    timeout = settings.diagnose.network_timeout_seconds
    tcp_targets, hosts = network_targets(settings)
    evidence = NetworkEvidence(
        tcp=tuple(probe_tcp(name, host, port, timeout) for name, host, port in tcp_targets),
        dns=tuple(resolve(host, timeout) for host in hosts),
    )
    return Diagnosis(check, title, evidence, tuple(network_findings(evidence)))


def network_findings(evidence: NetworkEvidence) -> list[Finding]:
    check = "network"
    findings: list[Finding] = []
    for p in evidence.tcp:
        if not p.ok:
            runbook = RB_DATABASE if p.name == "postgres" else RB_REDIS
            findings.append(
                Finding(
                    check,
                    Severity.CRITICAL,
                    f"{p.name} at {p.host}:{p.port} is not reachable over TCP: {p.error}",
                    runbook,
                    f"Restart {p.name} if it is down; check network policies (Kubernetes), security groups"
                    " and firewalls between the app and it",
                    FLOW_RESTART,
                )
            )
    for d in evidence.dns:
        if d.error is not None:
            findings.append(
                Finding(
                    check,
                    Severity.CRITICAL,
                    f"{d.host} does not resolve: {d.error}",
                    RB_NETWORK,
                    "Check DNS resolution (resolver, service names, search domains)",
                    None,
                )
            )
    if not findings:
        findings.append(
            Finding(
                check,
                Severity.OK,
                f"{len(evidence.tcp)} TCP targets reachable, {len(evidence.dns)} host names resolve",
                RB_NETWORK,
            )
        )
    return findings
