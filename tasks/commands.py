"""The one command runner: every external command (pg_dump, certbot, docker compose, nginx, npm) runs
through here.

- argv lists only, never a shell string;
- a timeout on every call; the command runs in its own process group (its own session), so a timeout,
  an error in the caller or a cancelled run kills the whole tree, grandchildren included;
- stdout and stderr are logged line by line to the run's log, with secrets masked;
- the recorded command and captured output are masked too;
- a typed :class:`CommandResult`.

:func:`run_command` captures output; :func:`stream_command` hands the caller a binary pipe to stdout
(or stdin) for data that must not be held in memory (a database dump), while stderr is still logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from tasks.errors import CommandError, CommandTimeout
from tasks.runlog import run_logger
from tasks.secrets import mask_text

# Environment variable names whose values are secrets: masked wherever the command's text appears.
_SECRET_ENV_MARKERS = ("PASSWORD", "SECRET", "TOKEN", "KEY", "PGPASS", "CREDENTIAL")
_KILL_GRACE_SECONDS = 3.0
_CAPTURE_LIMIT_LINES = 2000


@dataclass(frozen=True)
class CommandResult:
    """What a finished command did. ``argv``, ``stdout`` and ``stderr`` are already masked."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_seconds: float
    cwd: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def command_line(self) -> str:
        """The masked command as one line, for reports and change records."""
        return " ".join(_quote(a) for a in self.argv)


@dataclass
class _Secrets:
    values: tuple[str, ...] = ()

    def mask(self, text: str) -> str:
        return mask_text(text, self.values)


def _quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./:=@,+%" for c in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def _collect_secrets(env: Mapping[str, str] | None, secrets: Iterable[str]) -> _Secrets:
    values = [s for s in secrets if s]
    for key, value in (env or {}).items():
        if value and any(marker in key.upper() for marker in _SECRET_ENV_MARKERS):
            values.append(value)
    return _Secrets(tuple(values))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's process group, then SIGKILL what is left after a grace period."""
    if proc.poll() is not None:
        # The leader exited; children may still run in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_KILL_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_KILL_GRACE_SECONDS)


class _LineLogger(threading.Thread):
    """Reads a pipe line by line: logs each (masked) line and keeps the last lines for the result."""

    def __init__(self, pipe: IO[bytes], stream_name: str, program: str, secrets: _Secrets, log: bool):
        super().__init__(daemon=True, name=f"{program}-{stream_name}")
        self._pipe = pipe
        self._stream = stream_name
        self._program = program
        self._secrets = secrets
        self._log = log
        self.lines: deque[str] = deque(maxlen=_CAPTURE_LIMIT_LINES)
        self.truncated = False

    def run(self) -> None:
        logger = run_logger(__name__) if self._log else None
        with contextlib.suppress(ValueError, OSError):
            for raw in iter(self._pipe.readline, b""):
                line = self._secrets.mask(raw.decode("utf-8", errors="replace").rstrip("\n"))
                if len(self.lines) == self.lines.maxlen:
                    self.truncated = True
                self.lines.append(line)
                if logger is not None:
                    logger.info("[%s %s] %s", self._program, self._stream, line)

    def text(self) -> str:
        prefix = "[... earlier lines dropped ...]\n" if self.truncated else ""
        return prefix + "\n".join(self.lines)


def _prepare(
    argv: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str] | None,
    secrets: Iterable[str],
) -> tuple[list[str], dict[str, str], _Secrets, tuple[str, ...]]:
    if isinstance(argv, str | bytes) or not argv:
        raise TypeError("argv must be a non-empty list of arguments, not a shell string")
    args = [os.fspath(a) for a in argv]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    masker = _collect_secrets(env, secrets)
    masked_argv = tuple(masker.mask(a) for a in args)
    return args, full_env, masker, masked_argv


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
    input: bytes | None = None,
    check: bool = True,
    log_output: bool = True,
) -> CommandResult:
    """Run ``argv`` to completion with a timeout, logging its output to the run.

    Args:
        argv: the program and its arguments.
        timeout: seconds before the whole process group is killed.
        cwd: working directory.
        env: variables added to the current environment; values of names that look secret
            (``PGPASSWORD``, ``*_TOKEN``...) are masked in everything logged or returned.
        secrets: more values to mask.
        input: bytes written to the command's stdin, then closed.
        check: raise :class:`CommandError` on a non-zero exit.
        log_output: log each output line to the run (off for noisy commands).

    Returns:
        The masked :class:`CommandResult`.

    Raises:
        CommandTimeout: the command ran longer than ``timeout`` (its process group was killed).
        CommandError: ``check`` and the command exited non-zero, or the program was not found.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    args, full_env, masker, masked_argv = _prepare(argv, env, secrets)
    program = Path(args[0]).name
    logger = run_logger(__name__)
    logger.info("running: %s (timeout %ss)", " ".join(_quote(a) for a in masked_argv), timeout)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CommandError(f"{program}: program not found on PATH; install it or fix the setting") from None
    except PermissionError:
        raise CommandError(f"{program}: not executable; check its permissions") from None
    assert proc.stdout is not None
    assert proc.stderr is not None
    readers = [
        _LineLogger(proc.stdout, "stdout", program, masker, log_output),
        _LineLogger(proc.stderr, "stderr", program, masker, log_output),
    ]
    for reader in readers:
        reader.start()
    try:
        if input is not None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(input)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        for reader in readers:
            reader.join(timeout=_KILL_GRACE_SECONDS)
        tail = readers[1].text()[-2000:] or readers[0].text()[-2000:]
        raise CommandTimeout(
            f"{program} did not finish within {timeout}s and was killed (whole process group); "
            f"raise the timeout or look at why it hangs. Last output:\n{tail}"
        ) from None
    except BaseException:
        # Cancellation, KeyboardInterrupt, or an error in the caller: leave nothing running.
        _kill_group(proc)
        raise
    finally:
        # The leader exited, but a daemonized grandchild may hold the pipes open: end the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for reader in readers:
        reader.join(timeout=_KILL_GRACE_SECONDS)
    result = CommandResult(
        argv=masked_argv,
        returncode=returncode,
        stdout=readers[0].text(),
        stderr=readers[1].text(),
        duration_seconds=time.monotonic() - started,
        cwd=os.fspath(cwd) if cwd is not None else None,
    )
    logger.info("%s exited %s after %.2fs", program, returncode, result.duration_seconds)
    if check and returncode != 0:
        raise CommandError(
            f"{program} exited {returncode}: {result.command_line}\n"
            f"{(result.stderr or result.stdout)[-4000:]}"
        )
    return result


@dataclass
class StreamingCommand:
    """A running command whose stdout (``mode='read'``) or stdin (``mode='write'``) is a binary pipe."""

    argv: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    pipe: IO[bytes]
    stderr_reader: _LineLogger
    started: float
    timed_out: threading.Event = field(default_factory=threading.Event)
    result: CommandResult | None = None


@contextlib.contextmanager
def stream_command(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    mode: Literal["read", "write"] = "read",
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
    check: bool = True,
) -> Iterator[StreamingCommand]:
    """Run ``argv`` with a binary pipe to its stdout (read) or stdin (write), stderr logged.

    The block reads from (or writes to) ``cmd.pipe``. On leaving the block the pipe is closed, the
    command is waited for and ``cmd.result`` is set; an exception in the block, or the timeout
    passing (a watchdog kills the process group), kills the whole group.

    Raises:
        CommandTimeout: the command ran past ``timeout``.
        CommandError: ``check`` and the command exited non-zero, or the program was not found.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    args, full_env, masker, masked_argv = _prepare(argv, env, secrets)
    program = Path(args[0]).name
    logger = run_logger(__name__)
    logger.info("streaming: %s (timeout %ss)", " ".join(_quote(a) for a in masked_argv), timeout)
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.PIPE if mode == "write" else subprocess.DEVNULL,
            stdout=subprocess.PIPE if mode == "read" else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CommandError(f"{program}: program not found on PATH; install it or fix the setting") from None
    assert proc.stderr is not None
    pipe = proc.stdout if mode == "read" else proc.stdin
    assert pipe is not None
    # A larger pipe (1 MiB, the default limit for any user) lets both sides work in bigger steps.
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    stderr_reader = _LineLogger(proc.stderr, "stderr", program, masker, True)
    stderr_reader.start()
    cmd = StreamingCommand(masked_argv, proc, pipe, stderr_reader, time.monotonic())

    def _watchdog() -> None:
        cmd.timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout, _watchdog)
    timer.daemon = True
    timer.start()
    try:
        yield cmd
        with contextlib.suppress(BrokenPipeError):
            pipe.close()
        returncode = proc.wait()
    except BaseException:
        timer.cancel()
        _kill_group(proc)
        with contextlib.suppress(OSError, ValueError):
            pipe.close()
        if cmd.timed_out.is_set():
            raise CommandTimeout(f"{program} did not finish within {timeout}s and was killed") from None
        raise
    finally:
        timer.cancel()
        stderr_reader.join(timeout=_KILL_GRACE_SECONDS)
    if cmd.timed_out.is_set():
        raise CommandTimeout(
            f"{program} did not finish within {timeout}s and was killed (whole process group); "
            f"raise the timeout. Last output:\n{stderr_reader.text()[-2000:]}"
        )
    cmd.result = CommandResult(
        argv=masked_argv,
        returncode=returncode,
        stdout="",
        stderr=stderr_reader.text(),
        duration_seconds=time.monotonic() - cmd.started,
        cwd=os.fspath(cwd) if cwd is not None else None,
    )
    logger.info("%s exited %s after %.2fs", program, returncode, cmd.result.duration_seconds)
    if check and returncode != 0:
        raise CommandError(
            f"{program} exited {returncode}: {cmd.result.command_line}\n{cmd.result.stderr[-4000:]}"
        )
