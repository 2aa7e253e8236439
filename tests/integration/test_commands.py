"""The command runner against real processes: output, masking, timeouts that kill the whole tree."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tasks.commands import run_command, stream_command
from tasks.errors import CommandError, CommandTimeout

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def test_captures_output_and_exit_code() -> None:
    result = run_command([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"], timeout=30)
    assert result.ok
    assert result.stdout == "out"
    assert result.stderr == "err"
    assert result.duration_seconds > 0


def test_nonzero_exit_raises_with_stderr_tail() -> None:
    with pytest.raises(CommandError, match=r"exited 3.*\n.*boom"):
        run_command([PY, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], timeout=30)
    result = run_command([PY, "-c", "import sys; sys.exit(3)"], timeout=30, check=False)
    assert result.returncode == 3


def test_secrets_are_masked_in_argv_output_and_errors() -> None:
    secret = "Sup3rSecretValue"
    code = "import os, sys; print('pw is', os.environ['PGPASSWORD']); print(sys.argv[1]); sys.exit(1)"
    with pytest.raises(CommandError) as caught:
        run_command(
            [PY, "-c", code, f"postgresql://app:{secret}@db/x"],
            timeout=30,
            env={"PGPASSWORD": secret},
        )
    assert secret not in str(caught.value)
    result = run_command(
        [PY, "-c", code, "--password=" + secret], timeout=30, env={"PGPASSWORD": secret}, check=False
    )
    assert secret not in result.stdout
    assert secret not in result.command_line
    assert "***" in result.stdout


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # The child starts a grandchild that would outlive a plain kill of the child.
    code = (
        "import subprocess, sys, time;"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid));"
        "time.sleep(300)"
    )
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"did not finish within 1\.5s"):
        run_command([PY, "-c", code], timeout=1.5)
    assert time.monotonic() - started < 15
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_program_not_found_is_a_clear_error() -> None:
    with pytest.raises(CommandError, match="not found on PATH"):
        run_command(["definitely-not-a-program-xyz"], timeout=5)


def test_shell_strings_are_refused() -> None:
    with pytest.raises(TypeError, match="not a shell string"):
        run_command("ls -l", timeout=5)  # type: ignore[arg-type]


def test_stream_read_hands_over_stdout_bytes() -> None:
    with stream_command(
        [PY, "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4096)"], timeout=30
    ) as cmd:
        data = cmd.pipe.read()
    assert data == bytes(range(256)) * 4096
    assert cmd.result is not None
    assert cmd.result.ok


def test_stream_write_feeds_stdin(tmp_path: Path) -> None:
    target = tmp_path / "copy.bin"
    code = f"import sys, shutil; shutil.copyfileobj(sys.stdin.buffer, open({str(target)!r}, 'wb'))"
    payload = os.urandom(1 << 20)
    with stream_command([PY, "-c", code], timeout=30, mode="write") as cmd:
        cmd.pipe.write(payload)
    assert target.read_bytes() == payload


def test_stream_failure_and_timeout() -> None:
    with (
        pytest.raises(CommandError, match="exited 4"),
        stream_command([PY, "-c", "import sys; sys.exit(4)"], timeout=30) as cmd,
    ):
        cmd.pipe.read()
    with (
        pytest.raises(CommandTimeout),
        stream_command([PY, "-c", "import time; time.sleep(60)"], timeout=1) as cmd,
    ):
        cmd.pipe.read()


def test_error_in_the_block_kills_the_command() -> None:
    with (
        pytest.raises(RuntimeError, match="consumer failed"),
        stream_command([PY, "-c", "import time; print(1, flush=True); time.sleep(60)"], timeout=60) as cmd,
    ):
        pid = cmd.proc.pid
        cmd.pipe.readline()
        raise RuntimeError("consumer failed")
    assert not _alive(pid)
