"""A private PostgreSQL cluster for the point-in-time benchmarks: ``initdb`` and ``postgres`` as the
``postgres`` OS user (root cannot run them) in a temporary directory, ``wal_level=replica`` with room
for the archiver's replication slot, on a free port of 127.0.0.1 with its own socket directory;
stopped by PID and removed at the end. The shared server on 5432 is never touched.

The same approach as the tests' private clusters (tests/fixtures/pg_cluster.py), kept here because
benchmarks do not import the tests.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

PG_BIN = Path(f"/usr/lib/postgresql/{sorted(os.listdir('/usr/lib/postgresql'))[-1]}/bin")

WAL_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "log_timezone": "UTC",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchCluster:
    """One cluster: created at construction, :meth:`start`, :meth:`stop` (by PID), :meth:`close`.

    Args:
        prefix: name prefix of its temporary directory (under ``parent``).
        settings: server settings passed as ``-c name=value`` (on top of :data:`WAL_SETTINGS`).
        parent: where the directory goes (default TMPDIR); it must hold the whole cluster.
    """

    def __init__(
        self, prefix: str, settings: dict[str, str] | None = None, parent: Path | None = None
    ) -> None:
        self.port = free_port()
        self.settings = {**WAL_SETTINGS, **(settings or {})}
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self._user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"],
            user="postgres" if self._user is not None else None,
            cwd=self.dir,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    def start(self, timeout: float = 120) -> None:
        argv = [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.dir),
            **self.settings,
        }
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # a server for the benchmark's length
                argv,
                user="postgres" if self._user is not None else None,
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def execute(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            cur = conn.execute(statement)  # type: ignore[call-overload]
            return cur.fetchall() if cur.description else []

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after 60 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def shared_dir(prefix: str, parent: Path | None = None) -> Path:
    """A directory the ``postgres`` OS user can read and write (the recovery's WAL is fetched as it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777)
    return path


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a helper process the benchmark started (the archiver): SIGTERM, SIGKILL after 60 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
