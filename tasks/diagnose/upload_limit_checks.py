"""Upload size limits on the request path (runbook Common Issues 6 "Check nginx/reverse proxy limits
(if using nginx, check client_max_body_size)").

Three layers can refuse an upload before the app stores it, each read where it is decided:

- nginx: the configuration it has loaded, printed by ``nginx -T`` (the ``diagnose.nginx_config_argv``
  command, e.g. through ``docker exec``): ``client_max_body_size`` of each server block and of each
  location that sets its own, inherited from ``http`` and defaulting to nginx's 1m;
- a Kubernetes Ingress (``runtime.kind = "kubernetes"``): the ``nginx.ingress.kubernetes.io/proxy-body-size``
  annotation of each Ingress in the namespace, else the controller's default (a setting);
- the backend's own limit (Multer's ``limits.fileSize``), as set in ``diagnose.backend_upload_limit_mb``.

Each limit below ``diagnose.expected_upload_mb`` is a finding naming the runbook's resolution for
that layer. Nothing here changes anything, and the nginx configuration (which may hold secrets) is
neither logged nor shown: only file names, server names, locations and sizes are.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tasks.commands import run_command
from tasks.diagnose.model import RB_UPLOADS, Diagnosis, Finding, Severity
from tasks.errors import CommandError, CommandTimeout
from tasks.settings import OpsSettings

INGRESS_BODY_SIZE = "nginx.ingress.kubernetes.io/proxy-body-size"
NGINX_DEFAULT_BODY_SIZE = "1m"
_RUNBOOK_SIZE_MB = 50  # the runbook's "client_max_body_size 50M;"
_SIZE = re.compile(r"^([0-9]+)([kKmMgG]?)$")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_nginx_size(text: str) -> int | None:
    """An nginx size (``1024``, ``10k``, ``10m``, ``1g``) in bytes; None for ``0``, which is unlimited.

    Raises:
        ValueError: ``text`` is no nginx size.
    """
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an nginx size (a number with an optional k, m or g)")
    size = int(match[1]) * _UNITS[match[2].lower()]
    return size or None


def _shown_size(limit: int | None) -> str:
    return "unlimited" if limit is None else f"{limit / 2**20:g} MiB"


# --- nginx -T ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Directive:
    """One directive of an nginx configuration, where it is written, and its block (None: no block)."""

    name: str
    args: tuple[str, ...]
    source: str
    block: tuple[Directive, ...] | None = None


_FILE_HEADER = re.compile(r"^# configuration file (.+):$")


def split_nginx_dump(dump: str) -> dict[str, str]:
    """The files of an ``nginx -T`` dump, by path, in its order (the first is the main file)."""
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in dump.splitlines():
        header = _FILE_HEADER.match(line)
        if header:
            current = files.setdefault(header[1], [])
        elif current is not None:
            current.append(line)
    return {path: "\n".join(lines) for path, lines in files.items()}


def _unescape(ch: str) -> str:
    """What nginx makes of a backslash before ``ch``: quotes, backslash, \\t \\r \\n; else both kept."""
    if ch in "\"'\\":
        return ch
    return {"t": "\t", "r": "\r", "n": "\n"}.get(ch, "\\" + ch)


def _tokens(text: str, path: str) -> Iterator[tuple[str, str, bool]]:
    """nginx's tokens of ``text``: (token, "path:line", quoted); ``;``, ``{`` and ``}`` are tokens."""
    i, line, n = 0, 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
        elif ch.isspace():
            i += 1
        elif ch == "#":  # a comment starts only where a token would
            while i < n and text[i] != "\n":
                i += 1
        elif ch in ";{}":
            yield ch, f"{path}:{line}", False
            i += 1
        elif ch in "\"'":
            start_line = line
            i += 1
            value: list[str] = []
            while i < n and text[i] != ch:
                if text[i] == "\\" and i + 1 < n:
                    value.append(_unescape(text[i + 1]))
                    i += 2
                    continue
                if text[i] == "\n":
                    line += 1
                value.append(text[i])
                i += 1
            i += 1
            yield "".join(value), f"{path}:{start_line}", True
        else:
            value = []
            while i < n and not text[i].isspace() and text[i] not in ";{}":
                if text[i] == "\\" and i + 1 < n:
                    value.append(_unescape(text[i + 1]))
                    i += 2
                    continue
                if text[i] == "$" and text[i + 1 : i + 2] == "{":  # ${var}: its braces are the token's
                    end = text.find("}", i)
                    if end != -1:
                        value.append(text[i : end + 1])
                        i = end + 1
                        continue
                value.append(text[i])
                i += 1
            yield "".join(value), f"{path}:{line}", False


class _Parser:
    """Directives of the main file with ``include`` replaced by the included files of the dump."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        main = next(iter(files))
        self.conf_dir = os.path.dirname(main)  # nginx resolves relative includes against it

    def parse(self, path: str, depth: int = 0) -> tuple[Directive, ...]:
        tokens = list(_tokens(self.files[path], path))
        directives, _ = self._block(tokens, 0, depth)
        return tuple(directives)

    def _block(self, tokens: list[tuple[str, str, bool]], i: int, depth: int) -> tuple[list[Directive], int]:
        directives: list[Directive] = []
        words: list[str] = []
        source = ""
        while i < len(tokens):
            word, where, quoted = tokens[i]
            i += 1
            if quoted or word not in ";{}":
                if not words:
                    source = where
                words.append(word)
            elif word == ";":
                if words and words[0] == "include" and len(words) > 1:
                    directives += self._include(words[1], depth)
                elif words:
                    directives.append(Directive(words[0], tuple(words[1:]), source))
                words = []
            elif word == "{":
                block, i = self._block(tokens, i, depth)
                if words:
                    directives.append(Directive(words[0], tuple(words[1:]), source, tuple(block)))
                words = []
            else:  # "}": the end of this block
                return directives, i
        return directives, i

    def _include(self, pattern: str, depth: int) -> list[Directive]:
        if depth > 20:
            raise ValueError(f"nginx includes nest deeper than 20 levels at {pattern}")
        full = pattern if os.path.isabs(pattern) else os.path.join(self.conf_dir, pattern)
        included: list[Directive] = []
        for path in sorted(p for p in self.files if fnmatch.fnmatchcase(p, full)):
            included += self.parse(path, depth + 1)
        return included


@dataclass(frozen=True)
class BodyLimit:
    """One upload limit on the request path: the layer, where it applies, bytes (None: unlimited)."""

    layer: str  # nginx | ingress | backend
    where: str
    limit_bytes: int | None
    limit: str  # as written (``1m``, ``0``)
    source: str  # file:line, the annotation, the setting, or the default that applies


@dataclass(frozen=True)
class _Limit:
    size: int | None
    text: str
    source: str


def _own_limit(block: tuple[Directive, ...], inherited: _Limit) -> _Limit:
    found = [d for d in block if d.name == "client_max_body_size" and d.args]
    if not found:
        return inherited
    last = found[-1]  # nginx refuses duplicates; the last one is what a lenient reader would take
    return _Limit(parse_nginx_size(last.args[0]), last.args[0], last.source)


def _server_matches(names: tuple[str, ...], wanted: list[str]) -> bool:
    for name in names:
        for target in wanted:
            if name.startswith("~"):
                if re.search(name[1:], target):
                    return True
            elif name.startswith("."):
                if target == name[1:] or target.endswith(name):
                    return True
            elif fnmatch.fnmatchcase(target, name) or name == target:
                return True
    return False


def nginx_body_limits(dump: str, server_names: list[str]) -> tuple[list[BodyLimit], list[str]]:
    """``client_max_body_size`` of each server block (and each location setting its own) of an
    ``nginx -T`` dump, limited to the servers named ``server_names`` (all when empty).

    Returns:
        The limits, and the server blocks' names that were skipped (for the report).

    Raises:
        ValueError: the dump holds no configuration file, or a size nginx would not accept.
    """
    files = split_nginx_dump(dump)
    if not files:
        raise ValueError("the output holds no '# configuration file' section: is this `nginx -T`?")
    parser = _Parser(files)
    top = parser.parse(next(iter(files)))
    default = _Limit(parse_nginx_size(NGINX_DEFAULT_BODY_SIZE), NGINX_DEFAULT_BODY_SIZE, "nginx default")
    limits: list[BodyLimit] = []
    skipped: list[str] = []
    for http_block in (d for d in top if d.name == "http" and d.block is not None):
        assert http_block.block is not None
        http_limit = _own_limit(http_block.block, default)
        for server in (d for d in http_block.block if d.name == "server" and d.block is not None):
            assert server.block is not None
            names = tuple(a for d in server.block if d.name == "server_name" for a in d.args)
            shown = " ".join(names) if names else f"at {server.source}"
            if server_names and not _server_matches(names, server_names):
                skipped.append(shown)
                continue
            server_limit = _own_limit(server.block, http_limit)
            where = f"server {shown}"
            limits.append(
                BodyLimit("nginx", where, server_limit.size, server_limit.text, server_limit.source)
            )
            limits += _location_limits(server.block, server_limit, where)
    return limits, skipped


def _location_limits(block: tuple[Directive, ...], inherited: _Limit, where: str) -> list[BodyLimit]:
    """Locations (nested ones too) that set their own limit; the others inherit the server's."""
    found: list[BodyLimit] = []
    for location in (d for d in block if d.name == "location" and d.block is not None):
        assert location.block is not None
        own = _own_limit(location.block, inherited)
        here = f"{where}, location {' '.join(location.args)}"
        if own is not inherited:
            found.append(BodyLimit("nginx", here, own.size, own.text, own.source))
        found += _location_limits(location.block, own, here)
    return found


def read_nginx_config(argv: list[str], timeout: float) -> str:
    """The output of ``nginx -T`` (the configuration nginx has loaded, includes inlined by file).

    The output is not logged: a configuration may hold credentials (headers, auth).

    Raises:
        CommandError: the command was not found, or nginx refused its configuration (its message).
        CommandTimeout: it did not finish within ``timeout``.
    """
    result = run_command(argv, timeout=timeout, check=False, log_output=False)
    if not result.ok:
        messages = [line for line in result.stderr.splitlines() if "[emerg]" in line or "[alert]" in line]
        detail = "; ".join(messages[-3:]) or result.stderr.strip()[-500:] or "no message"
        raise CommandError(f"{result.command_line} exited {result.returncode}: {detail}")
    return result.stdout


# --- Kubernetes Ingress -----------------------------------------------------------------------------


def _ingress_class(ingress: Any) -> str | None:
    annotations = ingress.metadata.annotations or {}
    return ingress.spec.ingress_class_name or annotations.get("kubernetes.io/ingress.class")


def ingress_body_limits(settings: OpsSettings) -> tuple[list[BodyLimit], list[str]]:
    """The proxy-body-size of each nginx Ingress of the runtime namespace, and notes on the others.

    Raises:
        RuntimeUnavailable: no Kubernetes configuration.
        kubernetes.client.ApiException, urllib3 errors: the API refused or could not be reached.
    """
    from kubernetes import client

    from tasks.kubernetes import KubernetesRuntime

    runtime = KubernetesRuntime(settings)
    networking = client.NetworkingV1Api(runtime.api_client)
    timeout = settings.runtime.kubernetes.request_timeout_seconds
    items: list[Any] = networking.list_namespaced_ingress(runtime.namespace, _request_timeout=timeout).items
    default = settings.diagnose.ingress_default_body_size
    limits: list[BodyLimit] = []
    notes: list[str] = []
    for ingress in sorted(items, key=lambda i: i.metadata.name):
        hosts = ", ".join(r.host for r in (ingress.spec.rules or []) if r.host) or "any host"
        where = f"ingress {ingress.metadata.name} ({hosts})"
        ingress_class = _ingress_class(ingress)
        if ingress_class is not None and "nginx" not in ingress_class:
            notes.append(f"{where}: class {ingress_class} is not ingress-nginx; its body limit is not read")
            continue
        value = (ingress.metadata.annotations or {}).get(INGRESS_BODY_SIZE)
        if value is None:
            source = f"controller default (diagnose.ingress_default_body_size = {default})"
            limits.append(BodyLimit("ingress", where, parse_nginx_size(default), default, source))
            continue
        try:
            size = parse_nginx_size(value)
        except ValueError as exc:
            notes.append(f"{where}: annotation {INGRESS_BODY_SIZE} is ignored by the controller: {exc}")
            continue
        limits.append(BodyLimit("ingress", where, size, value, f"annotation {INGRESS_BODY_SIZE}"))
    return limits, notes


# --- The check ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadLimitsEvidence:
    expected_bytes: int
    limits: tuple[BodyLimit, ...]
    errors: tuple[tuple[str, str], ...] = ()  # (layer, what failed)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {
                "layer": lim.layer,
                "where": lim.where,
                "limit": lim.limit,
                "limit_mib": None if lim.limit_bytes is None else round(lim.limit_bytes / 2**20, 2),
                "source": lim.source,
                "below_expected": lim.limit_bytes is not None and lim.limit_bytes < self.expected_bytes,
            }
            for lim in self.limits
        ]
        rows += [
            {
                "layer": layer,
                "where": "",
                "limit": None,
                "limit_mib": None,
                "source": f"could not be read: {error}",
                "below_expected": None,
            }
            for layer, error in self.errors
        ]
        return rows


def upload_limits(settings: OpsSettings) -> Diagnosis:
    """Runbook 6 "Check nginx/reverse proxy limits": every upload limit on the request path."""
    check, title = "upload-limits", "Upload size limits"
    limits = settings.diagnose
    found: list[BodyLimit] = []
    errors: list[tuple[str, str]] = []
    notes: list[str] = []
    if limits.nginx_config_argv is not None:
        try:
            dump = read_nginx_config(limits.nginx_config_argv, limits.nginx_config_timeout_seconds)
            nginx, skipped = nginx_body_limits(dump, limits.nginx_server_names)
        except (CommandError, CommandTimeout, ValueError) as exc:
            errors.append(("nginx", str(exc)))
        else:
            found += nginx
            if skipped:
                notes.append(f"nginx server blocks not of the app: {', '.join(skipped)}")
            if limits.nginx_server_names and not nginx:
                errors.append(
                    (
                        "nginx",
                        f"no server block serves {', '.join(limits.nginx_server_names)}"
                        f" (servers: {', '.join(skipped) or 'none'})",
                    )
                )
    if settings.runtime.kind == "kubernetes":
        try:
            ingress, ingress_notes = ingress_body_limits(settings)
        except Exception as exc:  # the API's errors are many types (ApiException, urllib3, config)
            errors.append(("ingress", f"{type(exc).__name__}: {str(exc)[:300]}"))
        else:
            found += ingress
            notes += ingress_notes
    if limits.backend_upload_limit_mb is not None:
        size = int(limits.backend_upload_limit_mb * 2**20)
        found.append(
            BodyLimit(
                "backend",
                "backend",
                size,
                f"{limits.backend_upload_limit_mb:g} MiB",
                "setting diagnose.backend_upload_limit_mb",
            )
        )
    evidence = UploadLimitsEvidence(
        int(limits.expected_upload_mb * 2**20), tuple(found), tuple(errors), tuple(notes)
    )
    return Diagnosis(check, title, evidence, tuple(upload_limit_findings(evidence)))


def _resolution(layer: str, where: str, expected_bytes: int) -> str:
    size = max(_RUNBOOK_SIZE_MB, math.ceil(expected_bytes / 2**20))
    if layer == "nginx":
        return (
            f"Increase upload size limits: Nginx `client_max_body_size {size}M;` in {where}, then reload"
            " nginx (`nginx -t && nginx -s reload`)"
        )
    if layer == "ingress":
        return (
            f"Increase upload size limits: Kubernetes Ingress annotation `{INGRESS_BODY_SIZE}: {size}m`"
            f" on {where.split(' (')[0]}"
        )
    return (
        f"Increase upload size limits: Backend: Multer configuration (`limits.fileSize`, at least {size} MB),"
        " then set diagnose.backend_upload_limit_mb to it"
    )


_ERROR_RESOLUTIONS = {
    "nginx": (
        "Check diagnose.nginx_config_argv (e.g. `docker exec proxy nginx -T`) and"
        " diagnose.nginx_server_names; run `nginx -t` where nginx runs"
    ),
    "ingress": "Check the Kubernetes settings (runtime.kubernetes) and the right to list Ingresses",
}


def upload_limit_findings(evidence: UploadLimitsEvidence) -> list[Finding]:
    """Each limit below the expected upload size, each layer that could not be read; else ok."""
    check = "upload-limits"
    expected = evidence.expected_bytes
    findings: list[Finding] = []
    for layer, error in evidence.errors:
        what = "nginx configuration" if layer == "nginx" else "Kubernetes Ingresses"
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"the {what} could not be read: {error}",
                RB_UPLOADS,
                _ERROR_RESOLUTIONS[layer],
                None,
            )
        )
    for lim in evidence.limits:
        if lim.limit_bytes is None or lim.limit_bytes >= expected:
            continue
        findings.append(
            Finding(
                check,
                Severity.WARNING,
                f"{lim.layer} {lim.where} accepts at most {lim.limit} ({_shown_size(lim.limit_bytes)},"
                f" {lim.source}), below the expected {_shown_size(expected)}: larger uploads fail with"
                " 413 / 'File too large'",
                RB_UPLOADS,
                _resolution(lim.layer, lim.where, expected),
                None,
            )
        )
    if findings:
        return findings
    if not evidence.limits:
        return [
            Finding(
                check,
                Severity.INFO,
                "no upload limit was read: set diagnose.nginx_config_argv (nginx -T), run on Kubernetes for"
                " Ingresses, or set diagnose.backend_upload_limit_mb",
                RB_UPLOADS,
                None,
                None,
            )
        ]
    lowest = min(evidence.limits, key=lambda lim: math.inf if lim.limit_bytes is None else lim.limit_bytes)
    return [
        Finding(
            check,
            Severity.OK,
            f"every upload limit is at least the expected {_shown_size(expected)}; the lowest:"
            f" {lowest.layer} {lowest.where} {lowest.limit}",
            RB_UPLOADS,
        )
    ]
