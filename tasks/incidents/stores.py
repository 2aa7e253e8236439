"""Where the application's secrets live: ``KEY=value`` lines of the Compose env file (rewritten
atomically, every other line kept) or the keys of a Kubernetes Secret (a JSON merge patch). Each store
can check that it is usable, read, write and undo its last write.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tasks.settings import OpsSettings

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
    """Replace (or create) ``path`` with ``text`` in one rename, fsynced: a reader sees the old content or
    the new, never half. An existing file keeps its mode and owner; a new one is private (0600)."""
    try:
        stat: os.stat_result | None = path.stat()
    except FileNotFoundError:
        stat = None
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            if stat is not None:
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
