"""The uploads root cannot point at the system, and quarantine is never a delete in disguise.

Each rule is checked on real directories (the system's own where the rule is about them, which are
only ever stat'ed: the refusal comes before anything is listed) and the message names the rule and
the fix.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tasks import uploads
from tasks.errors import ParameterError, SettingsError
from tasks.settings import StorageSettings, UploadsSettings, load_settings
from tests.unit.test_uploads_scan import put

PROJECT = Path(__file__).resolve().parents[2]


def refused(settings: UploadsSettings, storage: StorageSettings | None = None) -> str:
    with pytest.raises(uploads.UploadsRootRefused) as caught:
        uploads.check_root(settings, storage)
    return str(caught.value)


@pytest.mark.parametrize(
    "root", ["/", "/etc", "/usr", "/var", "/var/lib", "/home", "/root", "/boot", "/tmp", "/usr/../etc/"]
)
def test_a_system_directory_or_an_ancestor_of_one_is_refused(root: str) -> None:
    message = refused(UploadsSettings(root=Path(root)))
    assert "system directory" in message
    assert "OPS_UPLOADS__ROOT" in message


@pytest.mark.parametrize("root", ["/etc/ssl", "/usr/lib/python3", "/boot/grub", "/proc/sys", "/usr/local/a"])
def test_anything_inside_a_system_tree_is_refused(root: str) -> None:
    message = refused(UploadsSettings(root=Path(root)))
    assert "inside the system tree" in message
    assert "OPS_UPLOADS__ROOT" in message


def test_directories_below_system_directories_stay_allowed(tmp_path: Path) -> None:
    home, project = Path("/root"), PROJECT
    for allowed in ("/var/lib/app/uploads", "/srv/app/uploads", "/home/app/uploads", "/opt/x/uploads"):
        assert uploads.location_refusal(Path(allowed), home=home, project=project) is None, allowed
    assert uploads.location_refusal(tmp_path, home=home, project=project) is None
    root = tmp_path / "uploads"
    root.mkdir()
    assert uploads.check_root(UploadsSettings(root=root)).path == root.resolve()


def test_the_home_directory_and_its_ancestors_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home" / "app"
    (home / "uploads").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for root in (home, home.parent):
        message = refused(UploadsSettings(root=root))
        assert "home directory" in message
    assert uploads.check_root(UploadsSettings(root=home / "uploads")).path == home / "uploads"


def test_a_symlink_as_root_is_refused_even_to_an_allowed_directory(tmp_path: Path) -> None:
    real = tmp_path / "real-uploads"
    real.mkdir()
    (tmp_path / "to-etc").symlink_to("/etc")
    (tmp_path / "to-real").symlink_to(real)
    for link in ("to-etc", "to-real"):
        message = refused(UploadsSettings(root=tmp_path / link))
        assert "symlink" in message
        assert "set uploads.root" in message


def test_the_projects_own_directory_and_its_ancestors_are_refused() -> None:
    assert "project's own directory" in refused(UploadsSettings(root=PROJECT))
    # An ancestor is refused too; where the checkout lies in a system directory (a clone under /tmp),
    # the system-directory rule names it first.
    message = refused(UploadsSettings(root=PROJECT.parent))
    assert "project's own directory" in message or "system directory" in message
    assert uploads.location_refusal(
        Path("/srv/checkout"), home=None, project=Path("/srv/checkout/swagger2mcp-ops")
    ) == ("it is the project's own directory /srv/checkout/swagger2mcp-ops or an ancestor of it")


def test_a_root_holding_the_quarantine_is_refused_in_every_mode(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    message = refused(UploadsSettings(root=root, quarantine_dir=root / "q"))
    assert "quarantine" in message
    assert "uploads.quarantine_dir" in message
    # The other way round: a root inside the quarantine.
    message = refused(UploadsSettings(root=root, quarantine_dir=tmp_path))
    assert "quarantine" in message


def test_a_root_holding_the_backup_storage_or_the_plans_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    message = refused(UploadsSettings(root=root), StorageSettings(url=f"file://{root}/backups"))
    assert "backup storage" in message
    assert "storage.url" in message
    message = refused(UploadsSettings(root=root, plan_dir=root / "plans"))
    assert "plans" in message
    assert "uploads.plan_dir" in message
    # Backups beside the root are fine.
    assert uploads.check_root(UploadsSettings(root=root), StorageSettings(url=f"file://{tmp_path}/b")).ok


def test_a_root_owned_by_another_user_than_expected_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    os.chown(root, 65534, 65534)
    message = refused(UploadsSettings(root=root, expected_owner="root"))
    assert "expected_owner" in message
    assert "owned by" in message
    for owner in ("65534", "nobody"):
        assert uploads.check_root(UploadsSettings(root=root, expected_owner=owner)).ok


def test_quarantine_retention_below_one_day_fails_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPS_UPLOADS__QUARANTINE_RETENTION_DAYS", "0")
    with pytest.raises(SettingsError, match=r"uploads\.quarantine_retention_days"):
        load_settings()
    monkeypatch.setenv("OPS_UPLOADS__QUARANTINE_RETENTION_DAYS", "1")
    assert load_settings().uploads.quarantine_retention_days == 1


def test_purge_never_touches_the_current_runs_quarantine(tmp_path: Path) -> None:
    quarantine = tmp_path / "q"
    now = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
    # The current run's id carries a time two days back (a clock that jumped, a long run).
    current = uploads.new_run_id(now - timedelta(days=2), "cccccc")
    older = uploads.new_run_id(now - timedelta(days=3), "dddddd")
    for run in (current, older):
        put(quarantine / run / "files" / "f", 60, b"12345")
        (quarantine / run / "manifest.jsonl").write_text(uploads.FileEntry("f", 5, 1, 1, 1, 1).to_json_line())

    record = uploads.purge_quarantine(
        quarantine, retention_days=1, now=now, confirm=True, current_run=current
    )

    assert record.runs == [older]
    assert (quarantine / current / "files" / "f").read_bytes() == b"12345"
    assert not (quarantine / older).exists()
    with pytest.raises(ParameterError, match="at least 1"):
        uploads.purge_quarantine(quarantine, retention_days=0, now=now, confirm=True)
    assert (quarantine / current).exists()
