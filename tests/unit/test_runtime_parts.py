"""Plain parts of the runtimes: the Compose command line, Docker times, Kubernetes quantities, and the
runtime chosen by settings (no client is imported until it is used)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.compose import ComposeRuntime, parse_docker_time
from tasks.kubernetes import KubernetesRuntime, _cpu_cores, _quantity_bytes
from tasks.runtime import NoRuntime, RuntimeUnavailable, get_runtime
from tasks.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_command_line_has_project_files_pins_and_env_file(tmp_path):
    settings = load_settings(
        stack="shop",
        runtime={
            "kind": "compose",
            "release_store": str(tmp_path),
            "compose": {"files": ["a.yml", "b.yml"], "env_file": ".env.staging"},
        },
    )
    runtime = get_runtime(settings)
    assert isinstance(runtime, ComposeRuntime)
    base = ["docker", "compose", "--project-name", "shop", "--file", "a.yml", "--file", "b.yml"]
    assert runtime.compose_argv("ps") == [*base, "--env-file", ".env.staging", "ps"]
    runtime._write_pins({"backend": "app:v2"})
    assert runtime.pinned_images() == {"backend": "app:v2"}
    assert runtime.compose_argv("ps") == [
        *base,
        "--file",
        str(tmp_path / "compose-images-shop.yml"),
        "--env-file",
        ".env.staging",
        "ps",
    ]


def test_docker_times():
    assert parse_docker_time("2026-11-28T20:11:03.123456789Z") == datetime(
        2026, 11, 28, 20, 11, 3, 123456, UTC
    )
    assert parse_docker_time("2026-11-28T20:11:03Z") == datetime(2026, 11, 28, 20, 11, 3, tzinfo=UTC)
    assert parse_docker_time("0001-01-01T00:00:00Z") is None
    assert parse_docker_time("") is None


def test_kubernetes_quantities():
    assert _quantity_bytes("128Mi") == 128 * 2**20
    assert _quantity_bytes("1G") == 10**9
    assert _quantity_bytes("4096") == 4096
    assert _cpu_cores("250m") == pytest.approx(0.25)
    assert _cpu_cores("1500000n") == pytest.approx(0.0015)
    assert _cpu_cores("2") == 2


def test_runtime_kinds():
    assert isinstance(get_runtime(load_settings()), NoRuntime)
    assert isinstance(get_runtime(load_settings(runtime={"kind": "kubernetes"})), KubernetesRuntime)
    with pytest.raises(RuntimeUnavailable, match="cannot roll back"):
        NoRuntime().rollback("backend")


def test_a_kubernetes_runtime_without_configuration_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    runtime = get_runtime(load_settings(runtime={"kind": "kubernetes"}))
    with pytest.raises(RuntimeUnavailable, match="OPS_RUNTIME__KUBERNETES__KUBECONFIG"):
        runtime.list_services()


def test_choosing_a_runtime_imports_no_client():
    code = (
        "import sys\n"
        "from tasks.runtime import get_runtime\n"
        "from tasks.settings import load_settings\n"
        "get_runtime(load_settings(runtime={'kind': 'compose'}))\n"
        "get_runtime(load_settings(runtime={'kind': 'kubernetes'}))\n"
        "print(','.join(m for m in ('docker', 'kubernetes') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
