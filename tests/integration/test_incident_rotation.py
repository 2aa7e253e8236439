"""Secret rotation against a PostgreSQL that checks passwords, a real env file and the Kubernetes
emulator: the new password logs in, the old one is refused, other lines stay, failures put back."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from tasks import incidents
from tasks.incidents import RotationFailed, RotationRefused
from tasks.settings import load_settings
from tests.fixtures.incidents import can_login

ENV_TEMPLATE = """\
# production secrets of the app
NODE_ENV=production
DATABASE_URL="postgresql://{role}:{password}@127.0.0.1:{port}/postgres?sslmode=disable"
export JWT_SECRET=old-jwt-secret-value
REDIS_URL=redis://127.0.0.1:6379/0   # shared

LOG_LEVEL='info'
"""


def _settings(scram_postgres, role, env_file: Path | None = None, **incident):
    section = {"rotate_roles": [role.name], "app_secrets": ["JWT_SECRET"], **incident}
    if env_file is not None:
        section.setdefault("compose_env_file", str(env_file))
        section.setdefault("role_secret_keys", {role.name: ["DATABASE_URL"]})
    return load_settings(postgres={"dsn": scram_postgres.admin_dsn}, incidents=section)


def _env_file(tmp_path: Path, scram_postgres, role) -> Path:
    path = tmp_path / "app.env"
    path.write_text(ENV_TEMPLATE.format(role=role.name, password=role.password, port=scram_postgres.port))
    path.chmod(0o640)
    return path


def test_dry_run_changes_nothing(scram_postgres, rotation_role, tmp_path):
    env_file = _env_file(tmp_path, scram_postgres, rotation_role)
    before = env_file.read_text()
    settings = _settings(scram_postgres, rotation_role, env_file)
    plan = incidents.plan_rotation(settings)
    assert not plan.problems
    assert {(t.kind, t.name) for t in plan.targets} == {
        ("postgres-role", rotation_role.name),
        ("app-secret", "JWT_SECRET"),
        ("role-carrier", "DATABASE_URL"),
    }
    record = incidents.rotate_secrets(settings, plan, confirm=False)
    assert record.dry_run
    assert not record.changed
    assert {s.outcome for s in record.secrets} == {"would rotate"}
    assert env_file.read_text() == before
    assert can_login(scram_postgres.dsn(rotation_role.name, rotation_role.password))


def test_rotation_new_password_works_old_fails(scram_postgres, rotation_role, tmp_path):
    env_file = _env_file(tmp_path, scram_postgres, rotation_role)
    settings = _settings(scram_postgres, rotation_role, env_file)
    record = incidents.rotate_secrets(settings, incidents.plan_rotation(settings), confirm=True)

    values = incidents.parse_env(env_file.read_text())
    new_url = values["DATABASE_URL"]
    new_password = urlsplit(new_url).password
    assert new_password
    assert new_password != rotation_role.password
    # The app's own URL (the env file's) logs in; the old password is refused.
    assert can_login(new_url.split("?")[0])
    assert not can_login(scram_postgres.dsn(rotation_role.name, rotation_role.password))

    # Only the named keys changed; comments, order, quoting and export are kept.
    lines = env_file.read_text().splitlines()
    assert lines[0] == "# production secrets of the app"
    assert lines[1] == "NODE_ENV=production"
    assert lines[2].startswith('DATABASE_URL="postgresql://')
    assert lines[2].endswith('?sslmode=disable"')
    assert lines[3].startswith("export JWT_SECRET=")
    assert values["JWT_SECRET"] != "old-jwt-secret-value"
    assert lines[4:] == ["REDIS_URL=redis://127.0.0.1:6379/0   # shared", "", "LOG_LEVEL='info'"]
    assert env_file.stat().st_mode & 0o777 == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".app.env")]

    # The record names and fingerprints secrets; it never holds a value.
    text = repr(record)
    assert new_password not in text
    assert values["JWT_SECRET"] not in text
    by_name = {s.name: s for s in record.secrets}
    assert (
        by_name[rotation_role.name].new_fingerprint == hashlib.sha256(new_password.encode()).hexdigest()[:8]
    )
    assert by_name["JWT_SECRET"].new_fingerprint == incidents.fingerprint(values["JWT_SECRET"])
    assert by_name["JWT_SECRET"].old_fingerprint == incidents.fingerprint("old-jwt-secret-value")
    assert any("ALTER ROLE" in c and "'***'" in c for c in record.commands)


def test_rotation_refused_with_problems_changes_nothing(scram_postgres, rotation_role, tmp_path):
    settings = load_settings(
        postgres={"dsn": scram_postgres.admin_dsn},
        incidents={
            "rotate_roles": [rotation_role.name, "ops_inc_role_absent"],
            "app_secrets": ["JWT_SECRET"],
            "compose_env_file": str(tmp_path / "missing.env"),
        },
    )
    plan = incidents.plan_rotation(settings)
    assert any("ops_inc_role_absent" in p for p in plan.problems)
    assert any("missing.env" in p for p in plan.problems)
    with pytest.raises(RotationRefused):
        incidents.rotate_secrets(settings, plan, confirm=True)
    assert can_login(scram_postgres.dsn(rotation_role.name, rotation_role.password))


def test_rotating_the_tools_own_role_is_refused(scram_postgres, rotation_role):
    settings = load_settings(
        postgres={"dsn": scram_postgres.dsn(rotation_role.name, rotation_role.password)},
        incidents={"rotate_roles": [rotation_role.name]},
    )
    plan = incidents.plan_rotation(settings)
    assert any("lock itself out" in p for p in plan.problems)


def test_kubernetes_secret_rotation_and_rollback_on_failure(
    scram_postgres, rotation_role, tmp_path, kube_emulator
):
    """Secret patched through the official client; when a store fails, the env file and the role's
    password are put back (the database transaction is never committed)."""
    from kubernetes import client

    core = client.CoreV1Api(kube_emulator.api())
    namespace = kube_emulator.namespace
    name = f"app-secrets-{rotation_role.name[-6:]}"
    core.create_namespaced_secret(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": {
                "JWT_SECRET": base64.b64encode(b"old-k8s-jwt").decode(),
                "OTHER": base64.b64encode(b"keep-me").decode(),
            },
        },
    )
    try:
        settings = load_settings(
            postgres={"dsn": scram_postgres.admin_dsn},
            runtime={"kubernetes": {"api_url": kube_emulator.url, "namespace": namespace}},
            incidents={"app_secrets": ["JWT_SECRET"], "kubernetes_secret": name},
        )
        plan = incidents.plan_rotation(settings)
        assert not plan.problems
        record = incidents.rotate_secrets(settings, plan, confirm=True)
        data = core.read_namespaced_secret(name, namespace).data
        new = base64.b64decode(data["JWT_SECRET"]).decode()
        assert new != "old-k8s-jwt"
        assert base64.b64decode(data["OTHER"]) == b"keep-me"
        assert record.secrets[0].new_fingerprint == incidents.fingerprint(new)

        # A rotation that fails after both stores were written: a second role vanishes after planning.
        env_file = _env_file(tmp_path, scram_postgres, rotation_role)
        env_before = env_file.read_text()
        core.patch_namespaced_secret(
            name,
            namespace,
            {"data": {"DATABASE_URL": base64.b64encode(b"postgresql://x:y@db/app").decode()}},
            _content_type="application/merge-patch+json",
        )
        secret_before = core.read_namespaced_secret(name, namespace).data
        doomed = f"{rotation_role.name}_gone"
        with psycopg.connect(scram_postgres.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(doomed)))
        both = load_settings(
            postgres={"dsn": scram_postgres.admin_dsn},
            runtime={"kubernetes": {"api_url": kube_emulator.url, "namespace": namespace}},
            incidents={
                "rotate_roles": [rotation_role.name, doomed],
                "app_secrets": ["JWT_SECRET"],
                "role_secret_keys": {rotation_role.name: ["DATABASE_URL"]},
                "compose_env_file": str(env_file),
                "kubernetes_secret": name,
            },
        )
        plan = incidents.plan_rotation(both)
        assert not plan.problems
        with psycopg.connect(scram_postgres.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(doomed)))
        with pytest.raises(RotationFailed, match="role passwords unchanged") as failure:
            incidents.rotate_secrets(both, plan, confirm=True)
        assert str(env_file) in str(failure.value)
        assert name in str(failure.value)
        assert env_file.read_text() == env_before
        assert core.read_namespaced_secret(name, namespace).data == secret_before
        # The first role's ALTER ROLE ran in the transaction that was rolled back.
        assert can_login(scram_postgres.dsn(rotation_role.name, rotation_role.password))
    finally:
        core.delete_namespaced_secret(name, namespace)
