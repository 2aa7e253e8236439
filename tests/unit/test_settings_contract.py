"""The settings contract for operators: a mistyped name, a malformed file or value, or an ambiguous DSN
fails at load with one message that names the source and shows a valid example; nothing is ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.errors import SettingsError
from tasks.settings import load_settings


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("OPS_POSTGRES_DSN", "OPS_POSTGRES__DSN"),
        ("OPS_POSTGRESS__DSN", "OPS_POSTGRES__DSN"),
        ("OPS_STORGE__URL", "OPS_STORAGE__URL"),
        ("OPS_HEALTH__TIMEOUT_SECOND", "OPS_HEALTH__TIMEOUT_SECONDS"),
        ("ops_redis__uri", "OPS_REDIS__URL"),
    ],
)
def test_unknown_variable_fails_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, suggestion: str
) -> None:
    monkeypatch.setenv(variable, "postgresql://app:hunter22@db.internal:5432/app")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("invalid settings; nothing was done")
    assert variable in message
    assert f"did you mean {suggestion}?" in message
    assert "hunter22" not in message


def test_known_variables_sections_as_json_and_open_maps_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_HEALTH", '{"urls": ["http://127.0.0.1:1/health"]}')
    monkeypatch.setenv("OPS_RUNTIME__COMPOSE__PROJECT", "shop")
    monkeypatch.setenv("OPS_TEST_ANYTHING", "tests own this prefix")
    settings = load_settings()
    assert settings.health.urls == ["http://127.0.0.1:1/health"]
    assert settings.runtime.compose.project == "shop"


def test_unknown_toml_key_names_file_and_closest_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "ops.toml"
    config.write_text('[postgres]\ndsn = "postgresql://u@h:5432/d"\n\n[storge]\nurl = "file:///srv/b"\n')
    monkeypatch.setenv("OPS_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert str(config) in message
    assert "storge" in message
    assert "did you mean storage?" in message


def test_malformed_toml_names_file_and_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "ops.toml"
    config.write_text('stack = "prod"\n[postgres]\ndsn = postgresql://u@h/d\n')
    monkeypatch.setenv("OPS_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("invalid settings; nothing was done")
    assert str(config) in message
    assert "line 3" in message


def test_unparsable_list_value_names_variable_and_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_QUEUE__NAMES", "default")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("invalid settings; nothing was done")
    assert "OPS_QUEUE__NAMES" in message
    assert "OPS_QUEUE__NAMES='[\"default\"]'" in message


def test_bad_value_shows_a_valid_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_HEALTH__TIMEOUT_SECONDS", "soon")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "for example OPS_HEALTH__TIMEOUT_SECONDS=" in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OPS_POSTGRES__DSN", "postgresql://app:p@ss@db.internal:5432/app"),
        ("OPS_POSTGRES__DSN", "postgresql://app:pa/ss@wd@db.internal:5432/app"),
        ("OPS_POSTGRES__DSN", "postgresql://app:pa#ss@db.internal:5432/app"),
        ("OPS_POSTGRES__DSN", "postgresql://app:pa?ss@db.internal:5432/app"),
        ("OPS_REDIS__URL", "redis://:se@cret@cache.internal:6379/0"),
    ],
)
def test_ambiguous_dsn_is_refused_fully_masked(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "percent-encode" in message
    for fragment in ("p@ss", "ss@", "pa/ss", "wd@", "pa#ss", "pa?ss", "se@cret", "cret@", "ss@db"):
        assert fragment not in message


def test_percent_encoded_password_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_POSTGRES__DSN", "postgresql://app:p%40ss@db.internal:5432/app")
    settings = load_settings()
    assert settings.postgres.masked_dsn == "postgresql://app:***@db.internal:5432/app"


def test_bad_value_in_file_names_its_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "ops.toml"
    config.write_text('stack = "prod"\n\n[health]\nurls = []\ntimeout_seconds = -2\n')
    monkeypatch.setenv("OPS_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert f"config file {config} ([health] timeout_seconds, line 5)" in str(caught.value)
