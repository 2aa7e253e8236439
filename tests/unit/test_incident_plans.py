"""Plain decisions of the incident flows: key groups, env file rewrites, password carriers, recent
changes and rollback proposals, step timings, settings validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks import incidents, redisdb
from tasks.errors import SettingsError
from tasks.incidents import RecentChange, StepLog
from tasks.releases import ReleaseRecord
from tasks.runtime import Revision, ServiceStatus
from tasks.settings import load_settings

NOW = datetime(2026, 11, 28, 20, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("key", "depth", "group"),
    [
        ("bull:default:123", 2, "bull:default:*"),
        ("bull:default:wait", 2, "bull:default:*"),
        ("bull:default:123:lock", 2, "bull:default:*"),
        ("bull:default:123:lock", 3, "bull:default:123:*"),
        ("bull:default:123", 1, "bull:*"),
        ("session:abc", 2, "session:*"),
        ("counter", 2, redisdb.NO_PREFIX),
        (":leading", 2, ":*"),
    ],
)
def test_key_group(key, depth, group):
    assert redisdb.key_group(key, depth) == group


ENV = """# comment: JWT_SECRET=not-this-one
JWT_SECRET=old
export API_TOKEN="quoted old"
  SPACED = 'single'
OTHER=keep # trailing comment
"""


def test_update_env_text_keeps_every_other_line():
    out = incidents.update_env_text(
        ENV, {"JWT_SECRET": "n1", "API_TOKEN": "n2", "SPACED": "n3", "NEW_KEY": "n4"}
    )
    assert out.splitlines() == [
        "# comment: JWT_SECRET=not-this-one",
        "JWT_SECRET=n1",
        'export API_TOKEN="n2"',
        "  SPACED = 'n3'",
        "OTHER=keep # trailing comment",
        "NEW_KEY=n4",
    ]
    parsed = incidents.parse_env(out)
    assert parsed == {"JWT_SECRET": "n1", "API_TOKEN": "n2", "SPACED": "n3", "OTHER": "keep", "NEW_KEY": "n4"}


def test_update_env_text_without_final_newline_and_crlf():
    assert incidents.update_env_text("A=1", {"B": "2"}) == "A=1\nB=2\n"
    assert incidents.update_env_text("A=1\r\nB=2\r\n", {"A": "x"}) == "A=x\r\nB=2\r\n"


def test_carry_password():
    url = "postgresql://app:old%40pw@db:5432/app?sslmode=require"
    assert (
        incidents.carry_password(url, "app", "NEW-pw_1")
        == "postgresql://app:NEW-pw_1@db:5432/app?sslmode=require"
    )
    # A URL of another user, or no URL at all: the value becomes the password itself.
    assert incidents.carry_password("postgresql://other:x@db/app", "app", "p") == "p"
    assert incidents.carry_password("old-password", "app", "p") == "p"
    assert incidents.carry_password("", "app", "p") == "p"


def test_generated_secrets_and_fingerprints():
    values = {incidents.generate_secret(32) for _ in range(50)}
    assert len(values) == 50
    assert all(len(v) >= 43 and all(c.isalnum() or c in "-_" for c in v) for v in values)
    assert incidents.fingerprint("abc") == "ba7816bf"


def _release(rid: str, kind: str, status: str, at: datetime, backend: str) -> ReleaseRecord:
    return ReleaseRecord(
        id=rid,
        environment="staging",
        kind=kind,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        images={"backend": backend},
        created_at=at,
        updated_at=at,
        migration_revision="abc",
    )


def _status(image: str, ready: int = 1) -> ServiceStatus:
    return ServiceStatus(name="backend", image=image, desired=1, ready=ready, state="running")


def test_recent_changes_window_and_no_double_counting():
    baseline = _release("r1", "baseline", "recorded", NOW - timedelta(days=3), "app:v1")
    old_deploy = _release("r2", "deploy", "succeeded", NOW - timedelta(hours=5), "app:v1")
    new_deploy = _release("r3", "deploy", "succeeded", NOW - timedelta(minutes=20), "app:v2")
    histories = {
        # Compose: the history is the release records themselves.
        "backend": [Revision("backend", "r3", {"backend": "app:v2"}, NOW - timedelta(minutes=20), True)],
        # Kubernetes: a ReplicaSet revision no release recorded (someone ran kubectl by hand).
        "worker": [
            Revision("worker", "4", {"worker": "app:v9"}, NOW - timedelta(minutes=5), True),
            Revision("worker", "3", {"worker": "app:v8"}, NOW - timedelta(days=1)),
        ],
    }
    migration = RecentChange("migration", "migration run 7", NOW - timedelta(minutes=30), "applied: a -> b")
    changes = incidents.recent_changes(
        [baseline, old_deploy, new_deploy], histories, [migration], window=timedelta(hours=2), now=NOW
    )
    assert [(c.kind, c.what) for c in changes] == [
        ("revision", "worker revision 4"),
        ("release", "r3"),
        ("migration", "migration run 7"),
    ]


def test_rollback_proposed_only_for_a_recent_release_of_an_unhealthy_stack():
    recent = [RecentChange("release", "r3", NOW - timedelta(minutes=20), "deploy succeeded")]
    good = _release("r1", "baseline", "recorded", NOW - timedelta(days=3), "app:v1")
    proposal = incidents.propose_rollback(
        recent, healthy=False, services=[_status("app:v2", 0)], previous_good=good
    )
    assert proposal is not None
    assert proposal.target_release == "r1"
    assert proposal.target_images == {"backend": "app:v1"}
    assert "r3" in proposal.describe()
    assert "app:v2" in proposal.describe()
    assert incidents.propose_rollback(recent, healthy=True, services=[], previous_good=good) is None
    assert incidents.propose_rollback(
        recent, healthy=True, services=[], previous_good=good, propose_when_healthy=True
    )
    migrations_only = [RecentChange("migration", "run 1", NOW, "")]
    assert incidents.propose_rollback(migrations_only, healthy=False, services=[], previous_good=good) is None


def test_step_log_times_steps_and_masks_errors():
    steps = StepLog(secrets=["hunter2-secret"])
    with steps.step("first") as step:
        step.detail = "did it"
    with pytest.raises(RuntimeError), steps.step("second"):
        raise RuntimeError("login with hunter2-secret failed")
    steps.skip("third", "not needed")
    rows = steps.rows()
    assert [(r["step"], r["outcome"]) for r in rows] == [
        ("first", "ok"),
        ("second", "failed"),
        ("third", "skipped"),
    ]
    assert rows[0]["detail"] == "did it"
    assert "hunter2-secret" not in rows[1]["detail"]
    assert "***" in rows[1]["detail"]
    assert all(r["duration_s"] >= 0 for r in rows)


def test_incident_settings_validation():
    with pytest.raises(SettingsError, match="not in rotate_roles"):
        load_settings(incidents={"role_secret_keys": {"app": ["DATABASE_URL"]}})
    with pytest.raises(SettingsError, match="app_secrets"):
        load_settings(incidents={"app_secrets": ["JWT SECRET"]})
    with pytest.raises(SettingsError, match="evidence_prefix"):
        load_settings(incidents={"evidence_prefix": "../x"})
    settings = load_settings(
        incidents={
            "rotate_roles": ["app"],
            "role_secret_keys": {"app": ["DATABASE_URL"]},
            "app_secrets": ["JWT"],
        }
    )
    assert settings.incidents.release_window_hours == 2.0
