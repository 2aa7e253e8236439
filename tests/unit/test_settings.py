"""Settings: embedded defaults, the TOML file, OPS_* overrides, and errors that name field and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.errors import SettingsError
from tasks.settings import load_settings


def test_embedded_defaults_need_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.postgres.dsn.get_secret_value().startswith("postgresql://postgres@127.0.0.1:5432/")
    assert settings.redis.url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.queue.names == ["default"]
    assert settings.queue.prefix == "bull"
    assert settings.storage.url == "file://./var/backups"
    assert settings.runtime.kind == "none"
    assert settings.health.urls == []


def test_toml_file_then_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "ops.toml"
    config.write_text(
        'stack = "prod"\n'
        "[postgres]\n"
        'dsn = "postgresql://app:s3cret@db.internal:5432/swagger2mcp"\n'
        "[queue]\n"
        'names = ["default", "emails"]\n'
        "[health]\n"
        'urls = ["https://example.test/health"]\n'
    )
    monkeypatch.setenv("OPS_CONFIG", str(config))
    monkeypatch.setenv("OPS_QUEUE__NAMES", '["only"]')
    monkeypatch.setenv("OPS_RUNTIME__KIND", "compose")
    settings = load_settings()
    assert settings.stack == "prod"
    assert settings.queue.names == ["only"]
    assert settings.runtime.kind == "compose"
    assert settings.postgres.masked_dsn == "postgresql://app:***@db.internal:5432/swagger2mcp"
    assert "s3cret" not in repr(settings)
    assert settings.health.urls == ["https://example.test/health"]


def test_ops_toml_in_working_directory_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "ops.toml").write_text('[storage]\nurl = "s3://backups/swagger2mcp"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings().storage.url == "s3://backups/swagger2mcp"


@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        ("OPS_POSTGRES__DSN", "mysql://root:hunter22@db/app", "postgres.dsn", "postgresql:// URL"),
        ("OPS_POSTGRES__DSN", "postgresql://u:hunter22@db:99999/app", "postgres.dsn", "invalid port"),
        ("OPS_RUNTIME__KIND", "nomad", "runtime.kind", "'compose', 'kubernetes' or 'none'"),
        ("OPS_HEALTH__TIMEOUT_SECONDS", "-1", "health.timeout_seconds", "greater than 0"),
        ("OPS_HEALTH__FAILED_JOBS_WARN", "-5", "health.failed_jobs_warn", "greater than or equal to 0"),
        ("OPS_STORAGE__URL", "ftp://host/dir", "storage.url", "file:///path or s3://"),
        ("OPS_QUEUE__NAMES", "[]", "queue.names", "at least 1"),
    ],
)
def test_bad_value_names_field_value_and_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str, value: str, field: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"- {field} = " in message
    assert f"environment variable {env}" in message
    assert expected in message
    assert "hunter22" not in message


def test_bad_value_in_file_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "prod.toml"
    config.write_text('[redis]\nurl = "http://user:topsecret@cache:6379"\n')
    monkeypatch.setenv("OPS_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "redis.url" in message
    assert f"config file {config}" in message
    assert "topsecret" not in message
    assert "http://user:***@cache:6379" in message


def test_unknown_key_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "ops.toml"
    config.write_text('[postgres]\ndns = "postgresql://x@y/z"\n')
    monkeypatch.setenv("OPS_CONFIG", str(config))
    with pytest.raises(SettingsError, match=r"postgres\.dns"):
        load_settings()


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPS_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match="names no readable file"):
        load_settings()


def test_settings_are_frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    with pytest.raises(Exception, match="frozen"):
        settings.health.timeout_seconds = 1  # type: ignore[misc]
