"""The settings reference (README table, ops.example.toml) is generated from the model and kept true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks import settings_doc
from tasks.settings import load_settings, setting_fields


def test_readme_table_lists_every_setting_as_the_model_has_it() -> None:
    readme = settings_doc.README.read_text()
    assert readme == settings_doc.readme_with_table(readme), (
        "README.md's settings table is stale: run python -m tasks.settings_doc --write"
    )
    listed = set(re.findall(r"^\| `(OPS_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    assert listed == {f.env for f in setting_fields() if not f.section}


def test_example_file_is_current() -> None:
    assert settings_doc.EXAMPLE.read_text() == settings_doc.example_toml(), (
        "ops.example.toml is stale: run python -m tasks.settings_doc --write"
    )


def test_every_setting_is_described() -> None:
    missing = [f.env for f in setting_fields() if not f.section and not (f.field.description or "").strip()]
    assert missing == []


def test_example_file_uncommented_is_a_valid_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Every value line, uncommented, must load: the examples and defaults it shows are real values.
    lines = []
    for line in settings_doc.EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"# ([a-z_]+) = (.+)", line)
        if match and not match.group(2).startswith("  ("):
            lines.append(f"{match.group(1)} = {match.group(2)}")
        elif not line.startswith("#"):
            lines.append(line)
    config = tmp_path / "ops.toml"
    config.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("OPS_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.stack == "swagger2mcp"
