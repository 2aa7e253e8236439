"""Shared state (release records, Compose image pins) lives under one absolute state directory: a
worker started from another working directory sees the same release history, and a relative path
is refused at load with a message that says what to give instead."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tasks.errors import SettingsError
from tasks.releases import ReleaseStore
from tasks.settings import load_settings

REPO = Path(__file__).resolve().parents[2]

_WRITE = """
import sys
from tasks.releases import ReleaseStore
from tasks.settings import load_settings
store = ReleaseStore.from_settings(load_settings(), sys.argv[1])
images = {"backend": "app:v7"}
record = store.record(kind="deploy", status="succeeded", images=images, migration_revision=None)
print(record.id)
"""


def test_release_history_written_from_one_directory_is_read_from_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The embedded default, as `make run` uses it: no state setting at all.
    environment = f"locks-test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPS_")} | {"PYTHONPATH": str(REPO)}
    written = subprocess.run(
        [sys.executable, "-c", _WRITE, environment],
        cwd=tmp_path / "a",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    monkeypatch.chdir(tmp_path / "b")
    store = ReleaseStore.from_settings(load_settings(), environment)
    try:
        assert store.path.is_absolute()
        assert [r.id for r in store.all()] == [written]
        assert store.get(written).images == {"backend": "app:v7"}
    finally:
        store.path.unlink(missing_ok=True)
        (store.directory / f".releases-{environment}.lock").unlink(missing_ok=True)


def test_state_paths_are_absolute_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = set()
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        runtime = load_settings().runtime
        assert runtime.state_dir.is_absolute()
        seen.add(runtime.releases_dir)
    assert len(seen) == 1
    monkeypatch.setenv("OPS_RUNTIME__STATE_DIR", str(tmp_path / "state"))
    assert load_settings().runtime.releases_dir == tmp_path / "state" / "releases"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OPS_RUNTIME__STATE_DIR", "var/state"),
        ("OPS_RUNTIME__RELEASE_STORE", "./var/releases"),
        ("OPS_RUNTIME__COMPOSE__IMAGES_FILE", "pins.yml"),
    ],
)
def test_a_relative_state_path_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match="must be an absolute path") as error:
        load_settings()
    assert variable in str(error.value)
