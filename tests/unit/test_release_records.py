"""Release records, rollback plans and the migration guard: plain functions, no services."""

from __future__ import annotations

import json
import threading

import pytest

from tasks.releases import (
    MigrationGuard,
    MigrationRevision,
    ReleaseStore,
    guard_migrations,
    plan_rollback,
)
from tasks.runtime import Revision, ServiceStatus, check_image_reference, check_image_tag, image_with_tag


def _status(name: str, image: str) -> ServiceStatus:
    return ServiceStatus(name=name, image=image, desired=1, ready=1, state="running")


def test_store_survives_a_new_instance_and_keeps_the_last_version(tmp_path):
    store = ReleaseStore(tmp_path, "staging")
    first = store.record(
        kind="baseline", status="recorded", images={"backend": "app:v1"}, migration_revision="a1"
    )
    second = store.record(
        kind="deploy", status="deploying", images={"backend": "app:v2"}, migration_revision="a1"
    )
    store.update(second, status="rolled-back", note="health failed")
    reopened = ReleaseStore(tmp_path, "staging")
    records = reopened.all()
    assert [r.id for r in records] == [first.id, second.id]
    assert records[1].status == "rolled-back"
    assert reopened.latest_good().id == first.id
    assert reopened.previous_good({"backend": "app:v2"}).id == first.id
    assert reopened.previous_good({"backend": "app:v1"}) is None
    # Another environment is another file.
    assert ReleaseStore(tmp_path, "production").all() == []


def test_store_skips_a_torn_line(tmp_path):
    store = ReleaseStore(tmp_path, "staging")
    store.record(kind="baseline", status="recorded", images={"backend": "app:v1"}, migration_revision=None)
    with store.path.open("a") as handle:
        handle.write('{"id": "r-torn", "environ')
    assert len(store.all()) == 1


def test_concurrent_writers_never_interleave(tmp_path):
    store = ReleaseStore(tmp_path, "staging")

    def write(n: int) -> None:
        for i in range(20):
            store.record(
                kind="deploy", status="succeeded", images={"backend": f"app:{n}-{i}"}, migration_revision=None
            )

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = store.path.read_text().splitlines()
    assert len(lines) == 80
    assert all(json.loads(line)["environment"] == "staging" for line in lines)


def test_environment_name_is_validated(tmp_path):
    with pytest.raises(Exception, match="environment"):
        ReleaseStore(tmp_path, "../etc")


@pytest.mark.parametrize(
    ("image", "tag", "expected"),
    [
        ("app:v1", "v2", "app:v2"),
        ("app", "v2", "app:v2"),
        ("registry:5000/team/app:v1", "1.4.2", "registry:5000/team/app:1.4.2"),
        ("registry:5000/team/app", "1.4.2", "registry:5000/team/app:1.4.2"),
        ("app@sha256:abc", "v3", "app:v3"),
    ],
)
def test_image_with_tag(image, tag, expected):
    assert image_with_tag(image, tag) == expected


@pytest.mark.parametrize("tag", ["", "a:b", "x/y", "a b"])
def test_image_with_tag_rejects_non_tags(tag):
    with pytest.raises(ValueError, match="tag"):
        image_with_tag("app:v1", tag)


def test_plan_prefers_a_kept_revision_and_skips_unchanged():
    current = [_status("backend", "app:v2"), _status("worker", "app:v1")]
    histories = {
        "backend": [
            Revision("backend", "1", {"backend": "app:v1"}),
            Revision("backend", "2", {"backend": "app:v2"}, current=True),
        ],
        "worker": [],
    }
    steps = plan_rollback(current, {"backend": "app:v1", "worker": "app:v1"}, histories)
    assert [(s.service, s.method, s.revision) for s in steps] == [
        ("backend", "revision", "1"),
        ("worker", "none", None),
    ]
    assert steps[0].describe() == "backend: app:v2 -> app:v1 (rollout undo to revision 1)"
    no_history = plan_rollback(current, {"backend": "app:v0"}, histories)
    assert no_history[0].method == "image"


def test_guard_names_the_migration_applied_since(tmp_path):
    store = ReleaseStore(tmp_path, "staging")
    old = store.record(
        kind="baseline", status="recorded", images={"backend": "app:v1"}, migration_revision="a1"
    )
    store.record(kind="deploy", status="succeeded", images={"backend": "app:v2"}, migration_revision="b2")
    with pytest.raises(MigrationGuard, match="'b2'"):
        guard_migrations(store.all(), old, MigrationRevision("b2", "alembic_version"), force=False)
    assert guard_migrations(store.all(), old, MigrationRevision("b2", "alembic_version"), force=True) == [
        "b2"
    ]
    # Same revision now as then: nothing crossed.
    assert guard_migrations(store.all(), old, MigrationRevision("a1", "alembic_version"), force=False) == []


def test_guard_cannot_judge_a_release_without_a_revision(tmp_path):
    store = ReleaseStore(tmp_path, "staging")
    old = store.record(
        kind="baseline", status="recorded", images={"backend": "app:v1"}, migration_revision=None
    )
    assert guard_migrations(store.all(), old, MigrationRevision("b2", "alembic_version"), force=False) == []


@pytest.mark.parametrize(
    "tag", ["1.0;id", "$(id)", "-rf", "1.0\nid", ".hidden", "a" * 129, "v1 ", "v1\n", "ü1", "sha256:abc"]
)
def test_image_tags_follow_the_oci_grammar(tag):
    with pytest.raises(ValueError, match="is not an image tag"):
        check_image_tag(tag)


@pytest.mark.parametrize("tag", ["v1", "1.4.2", "_x", "A-b_c.1", "a" * 128, "sha256:" + "0" * 64])
def test_valid_image_tags(tag):
    assert check_image_tag(tag) == tag


@pytest.mark.parametrize(
    "image",
    [
        "app",
        "s2m-ops-test/app:v3",
        "registry.example.com:5000/team/app:1.4.2",
        "localhost/app:v1",
        "[::1]:5000/app:v1",
        "a__b/c-d--e.f:x",
        "ghcr.io/x/y:1@sha256:" + "b" * 64,
        "app@sha512:" + "c" * 128,
    ],
)
def test_valid_image_references(image):
    assert check_image_reference(image) == image


@pytest.mark.parametrize(
    ("image", "part"),
    [
        ("-rf", "repository"),
        ("s2m-ops-test/app:$(id)", "tag"),
        ("app:1.0;id", "tag"),
        ("app:v1\nid", "tag"),
        ("Team/app", "repository"),
        ("a//b", "repository"),
        ("app@sha256:abc", "digest"),
        ("app@md5", "digest"),
        ("bad_host.io/app", "registry"),
        ("", "empty"),
        ("a" * 256, "longer than"),
    ],
)
def test_image_references_outside_the_grammar(image, part):
    with pytest.raises(ValueError, match=part):
        check_image_reference(image)


def test_image_tag_may_be_a_digest():
    digest = "sha256:" + "c" * 64
    assert image_with_tag("reg:5000/app:v1", digest) == f"reg:5000/app@{digest}"
