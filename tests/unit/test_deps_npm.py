"""Plain functions of dependency updates: ranges, audit parsing, planning, lockfile diff, tags, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from flows.dependencies import DependencyRun, change_rows, lockfile_markdown, render_markdown
from tasks import dependencies as deps
from tasks.errors import ParameterError
from tasks.settings import DependenciesSettings, load_settings

AUDIT = {
    "auditReportVersion": 2,
    "vulnerabilities": {
        "leftpad-ops": {
            "name": "leftpad-ops",
            "severity": "high",
            "isDirect": True,
            "via": [
                {
                    "source": 1099001,
                    "name": "leftpad-ops",
                    "dependency": "leftpad-ops",
                    "title": "Prototype pollution in leftpad-ops",
                    "url": "https://advisories.invalid/1099001",
                    "severity": "high",
                    "range": "<1.0.1",
                }
            ],
            "effects": ["wrapper-ops"],
            "range": "1.0.0",
            "nodes": ["node_modules/leftpad-ops"],
            "fixAvailable": True,
        },
        "deep-ops": {
            "name": "deep-ops",
            "severity": "moderate",
            "isDirect": False,
            "via": [
                {"source": 7, "name": "deep-ops", "title": "ReDoS", "severity": "moderate", "range": "<2.1.0"}
            ],
            "effects": ["wrapper-ops"],
            "range": "<2.1.0",
            "nodes": ["node_modules/deep-ops"],
            "fixAvailable": True,
        },
        "wrapper-ops": {
            "name": "wrapper-ops",
            "severity": "moderate",
            "isDirect": True,
            "via": ["deep-ops"],
            "effects": [],
            "range": "*",
            "nodes": ["node_modules/wrapper-ops"],
            "fixAvailable": {"name": "wrapper-ops", "version": "3.0.0", "isSemVerMajor": True},
        },
    },
    "metadata": {"vulnerabilities": {"high": 1, "moderate": 2, "total": 3}},
}

LOCK_BEFORE = {
    "lockfileVersion": 3,
    "packages": {
        "": {"name": "app", "dependencies": {"leftpad-ops": "^1.0.0"}},
        "node_modules/leftpad-ops": {"version": "1.0.0"},
        "node_modules/wrapper-ops": {"version": "2.0.0"},
        "node_modules/deep-ops": {"version": "2.0.3"},
        "node_modules/wrapper-ops/node_modules/@scope/old": {"version": "0.1.0"},
    },
}
LOCK_AFTER = {
    "lockfileVersion": 3,
    "packages": {
        "": {"name": "app", "dependencies": {"leftpad-ops": "^1.0.1"}},
        "node_modules/leftpad-ops": {"version": "1.0.1"},
        "node_modules/wrapper-ops": {"version": "2.0.0"},
        "node_modules/deep-ops": {"version": "2.1.0"},
        "node_modules/@scope/new": {"version": "1.0.0"},
    },
}
PACKAGE_JSON = {"dependencies": {"leftpad-ops": "^1.0.0", "wrapper-ops": "^2.0.0"}}


@pytest.mark.parametrize(
    ("version", "range_text", "expected"),
    [
        ("1.0.0", "<1.0.1", True),
        ("1.0.1", "<1.0.1", False),
        ("1.0.1-rc.1", "<1.0.1", True),
        ("2.3.0", ">=2.0.0 <2.3.1", True),
        ("2.3.1", ">= 2.0.0 < 2.3.1", False),
        ("1.5.0", "<=1.2.3 || >=1.4.0 <1.6.0", True),
        ("1.3.0", "<=1.2.3 || >=1.4.0 <1.6.0", False),
        ("1.9.9", "^1.2.3", True),
        ("2.0.0", "^1.2.3", False),
        ("0.2.9", "^0.2.3", True),
        ("0.3.0", "^0.2.3", False),
        ("1.2.9", "~1.2.3", True),
        ("1.3.0", "~1.2.3", False),
        ("1.4.2", "1.x", True),
        ("2.0.0", "1.x", False),
        ("1.2.0", "1.0.0 - 1.2.0", True),
        ("1.2.1", "1.0.0 - 1.2.0", False),
        ("3.0.0", "*", True),
        ("1.2.5", "<=1.2", True),
        ("1.3.0", "<=1.2", False),
        ("1.0.0", "=1.0.0", True),
        ("1.0.0", "not a range", True),
    ],
)
def test_satisfies_reads_advisory_and_package_ranges(version: str, range_text: str, expected: bool) -> None:
    assert deps.satisfies(version, range_text) is expected


def test_lowest_fixed_version_skips_vulnerable_prerelease_and_older() -> None:
    versions = ["0.9.0", "1.0.0", "1.0.1-rc.1", "1.0.1", "1.1.0", "2.0.0"]
    assert deps.lowest_fixed_version("1.0.0", versions, ["<1.0.1"]) == "1.0.1"
    assert deps.lowest_fixed_version("1.0.0", versions, ["<1.0.1", ">=1.0.1 <1.1.0"]) == "1.1.0"
    assert deps.lowest_fixed_version("1.0.0", versions, ["*"]) is None


def test_parse_audit_groups_advisories_by_package_and_severity() -> None:
    report = deps.parse_audit(AUDIT)
    assert [p.name for p in report.packages] == ["deep-ops", "leftpad-ops", "wrapper-ops"]
    assert [(a.package, a.id, a.severity) for a in report.advisories] == [
        ("leftpad-ops", "1099001", "high"),
        ("deep-ops", "7", "moderate"),
    ]
    assert report.by_severity() == {"critical": 0, "high": 1, "moderate": 1, "low": 0, "info": 0}
    wrapper = report.package("wrapper-ops")
    assert wrapper is not None
    assert wrapper.advisories == ()
    assert wrapper.via_packages == ("deep-ops",)
    assert wrapper.fix_is_major


def test_parse_audit_error_says_what_to_check() -> None:
    with pytest.raises(deps.DependencyError, match="advisories/bulk"):
        deps.parse_audit(
            {"error": {"code": "ENOAUDIT", "summary": "Your configured registry does not support audit"}}
        )


def test_plan_security_installs_lowest_fix_for_direct_and_updates_transitive() -> None:
    versions = {"leftpad-ops": ["1.0.0", "1.0.1", "1.1.0", "2.0.0"]}
    plan = deps.plan_updates(
        "security", deps.parse_audit(AUDIT), [], LOCK_BEFORE, PACKAGE_JSON, versions.__getitem__
    )
    assert [a.args for a in plan.actions] == [("install", "leftpad-ops@1.0.1"), ("update", "deep-ops")]
    assert "1099001" in plan.actions[0].reason
    assert plan.unfixable == ()


def test_plan_security_reports_unfixable() -> None:
    plan = deps.plan_updates(
        "security",
        deps.parse_audit(AUDIT),
        [],
        LOCK_BEFORE,
        {"dependencies": {"leftpad-ops": "1"}},
        lambda _: ["1.0.0"],
    )
    assert plan.unfixable == ("leftpad-ops@1.0.0: no published version outside <1.0.1",)


def test_plan_minor_and_latest() -> None:
    stale = [
        deps.OutdatedPackage("leftpad-ops", "1.0.0", "1.1.0", "2.0.0"),
        deps.OutdatedPackage("deep-ops", "2.0.3", "2.1.0", "2.1.0"),  # transitive: not moved by latest
    ]
    report = deps.parse_audit(AUDIT)
    minor = deps.plan_updates("minor", report, stale, LOCK_BEFORE, PACKAGE_JSON, lambda _: [])
    assert [a.args for a in minor.actions] == [("update",)]
    latest = deps.plan_updates("latest", report, stale, LOCK_BEFORE, PACKAGE_JSON, lambda _: [])
    assert [a.args for a in latest.actions] == [("install", "leftpad-ops@2.0.0")]
    with pytest.raises(ParameterError, match="scope"):
        deps.plan_updates("everything", report, stale, LOCK_BEFORE, PACKAGE_JSON, lambda _: [])


def test_parse_outdated_accepts_dicts_and_lists() -> None:
    rows = deps.parse_outdated(
        {
            "b": {"current": "1.0.0", "wanted": "1.1.0", "latest": "2.0.0"},
            "a": [{"current": "1.0.0", "wanted": "1.0.0", "latest": "3.0.0", "dependent": "ws"}],
        }
    )
    assert [(r.name, r.current, r.latest) for r in rows] == [("a", "1.0.0", "3.0.0"), ("b", "1.0.0", "2.0.0")]


def test_diff_lockfiles_v3() -> None:
    changes = deps.diff_lockfiles(LOCK_BEFORE, LOCK_AFTER)
    assert [(c.path, c.name, c.before, c.after, c.kind) for c in changes] == [
        ("node_modules/@scope/new", "@scope/new", None, "1.0.0", "added"),
        ("node_modules/deep-ops", "deep-ops", "2.0.3", "2.1.0", "changed"),
        ("node_modules/leftpad-ops", "leftpad-ops", "1.0.0", "1.0.1", "changed"),
        ("node_modules/wrapper-ops/node_modules/@scope/old", "@scope/old", "0.1.0", None, "removed"),
    ]


def test_diff_lockfiles_v1_nested_dependencies() -> None:
    before = {
        "lockfileVersion": 1,
        "dependencies": {"a": {"version": "1.0.0", "dependencies": {"b": {"version": "1.0.0"}}}},
    }
    after = {
        "lockfileVersion": 1,
        "dependencies": {"a": {"version": "1.0.0", "dependencies": {"b": {"version": "1.2.0"}}}},
    }
    assert [(c.path, c.before, c.after) for c in deps.diff_lockfiles(before, after)] == [
        ("node_modules/a/node_modules/b", "1.0.0", "1.2.0")
    ]


def test_compare_audits_fixed_remaining_introduced() -> None:
    before = deps.parse_audit(AUDIT)
    after_data = json.loads(json.dumps(AUDIT))
    del after_data["vulnerabilities"]["leftpad-ops"]
    after_data["vulnerabilities"]["new-ops"] = {
        "name": "new-ops",
        "severity": "low",
        "via": [{"source": 9, "name": "new-ops", "title": "x", "severity": "low", "range": "*"}],
    }
    delta = deps.compare_audits(before, deps.parse_audit(after_data))
    assert [a.id for a in delta.fixed] == ["1099001"]
    assert [a.id for a in delta.remaining] == ["7"]
    assert [a.id for a in delta.introduced] == ["9"]
    assert delta.fixed_by_severity()["high"] == 1


def test_npm_environment_keeps_the_token_out_of_files(tmp_path: Path) -> None:
    settings = DependenciesSettings(
        registry_url="http://127.0.0.1:15570", registry_token=SecretStr("s3cr3t-token-value")
    )
    env = deps.npm_environment(settings, tmp_path)
    npmrc = (tmp_path / "npmrc").read_text()
    assert "s3cr3t-token-value" not in npmrc
    assert "//127.0.0.1:15570/:_authToken=${NPM_REGISTRY_TOKEN}" in npmrc
    assert env.env["npm_config_registry"] == "http://127.0.0.1:15570/"
    assert env.env["NPM_REGISTRY_TOKEN"] == "s3cr3t-token-value"
    assert "s3cr3t" not in repr(env)


def test_tag_and_build_command(tmp_path: Path) -> None:
    lock = tmp_path / "package-lock.json"
    lock.write_text('{"lockfileVersion": 3}')
    tag = deps.tag_for_lockfile(lock)
    assert tag.startswith("deps-")
    assert len(tag) == len("deps-") + 12
    assert deps.tag_for_lockfile(lock) == tag
    lock.write_text('{"lockfileVersion": 3, "packages": {}}')
    assert deps.tag_for_lockfile(lock) != tag
    settings = load_settings(dependencies={"image_name": "app"})
    assert deps.build_command(settings, tmp_path, "deps-1") == [
        "docker",
        "build",
        "-t",
        "app:deps-1",
        str(tmp_path),
    ]
    custom = load_settings(
        dependencies={"image_name": "app", "build_argv": ["make", "image", "TAG={tag}", "REF={ref}"]}
    )
    assert deps.build_command(custom, tmp_path, "deps-1") == [
        "make",
        "image",
        "TAG=deps-1",
        "REF=app:deps-1",
    ]
    with pytest.raises(ValueError, match="tag"):
        deps.build_command(settings, tmp_path, "bad tag")


def test_settings_reject_a_bad_registry_and_empty_build_argv() -> None:
    from tasks.errors import SettingsError

    with pytest.raises(SettingsError, match="registry_url"):
        load_settings(dependencies={"registry_url": "ftp://x"})
    with pytest.raises(SettingsError, match="build_argv"):
        load_settings(dependencies={"build_argv": []})


def test_report_of_failed_tests_shows_output_and_changes(tmp_path: Path) -> None:
    run = DependencyRun("stack", "latest", tmp_path, deploy_to_staging=True)
    run.audit_before = deps.parse_audit(AUDIT)
    run.audit_after = deps.parse_audit({**AUDIT, "vulnerabilities": {}})
    run.update = deps.UpdateResult(
        "latest",
        ("npm install leftpad-ops@2.0.0",),
        tuple(deps.diff_lockfiles(LOCK_BEFORE, LOCK_AFTER)),
        "a" * 64,
        "b" * 64,
    )
    run.tests = deps.TestRun("npm test", 1, "AssertionError: leftpad-ops must export a function", 0.4)
    run.outcome = "tests failed"
    text = render_markdown(run)
    assert "**tests failed**" in text
    assert "leftpad-ops must export a function" in text
    assert "| high | 1 | 1 | 0 |" in text
    rows = change_rows(run)
    assert {
        "package": "leftpad-ops",
        "from": "1.0.0",
        "to": "1.0.1",
        "advisories fixed": "1099001 (high) Prototype pollution in leftpad-ops: https://advisories.invalid/1099001",
    } in rows
    assert all(r["package"] != "@scope/old" for r in rows)  # nested installs only in the lockfile diff
    assert "node_modules/wrapper-ops/node_modules/@scope/old" in lockfile_markdown(run)


def test_nothing_to_do_when_clean() -> None:
    """A second security run after the fix plans nothing (so the flow ends before tests and build)."""
    clean = deps.parse_audit({"auditReportVersion": 2, "vulnerabilities": {}, "metadata": {}})
    plan = deps.plan_updates(
        "security", clean, [], LOCK_AFTER, PACKAGE_JSON, lambda _: pytest.fail("no lookup")
    )
    assert plan.actions == ()
    assert deps.plan_updates("latest", clean, [], LOCK_AFTER, PACKAGE_JSON, lambda _: []).actions == ()


def test_fixed_advisories_carry_their_title_and_url(tmp_path: Path) -> None:
    """The report, the package table and the summary name each fixed advisory, not only its number."""
    run = DependencyRun("stack", "security", tmp_path, deploy_to_staging=False)
    run.audit_before = deps.parse_audit(AUDIT)
    run.audit_after = deps.parse_audit({**AUDIT, "vulnerabilities": {}})
    run.update = deps.UpdateResult(
        "security",
        ("npm install leftpad-ops@1.0.1",),
        tuple(deps.diff_lockfiles(LOCK_BEFORE, LOCK_AFTER)),
        "a" * 64,
        "b" * 64,
    )
    text = render_markdown(run)
    fixed = text.split("## Advisories fixed", 1)[1]
    assert "[Prototype pollution in leftpad-ops (1099001)](https://advisories.invalid/1099001)" in fixed
    assert "| deep-ops | moderate | ReDoS (7) |" in fixed  # no URL in the audit: the title and number
    row = next(r for r in change_rows(run) if r["package"] == "leftpad-ops")
    assert row["advisories fixed"] == (
        "1099001 (high) Prototype pollution in leftpad-ops: https://advisories.invalid/1099001"
    )
    assert {
        "id": "1099001",
        "package": "leftpad-ops",
        "severity": "high",
        "title": "Prototype pollution in leftpad-ops",
        "url": "https://advisories.invalid/1099001",
    } in run.summary()["fixed_advisories"]


def test_prune_keeps_the_newest_and_any_run_directory_in_use(tmp_path: Path) -> None:
    """Real directories and locks: a run still holding its directory keeps it, however old it is."""
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
    names = [deps.run_directory_name(start + timedelta(days=i), "security", f"{i:06x}") for i in range(4)]
    with deps.claim_run_directory(tmp_path, names[0]) as busy:
        for name in names[1:]:
            with deps.claim_run_directory(tmp_path, name) as path:
                (path / "src" / "node_modules" / "x").mkdir(parents=True)
        dry = deps.prune_working_copies(tmp_path, 2)
        assert [p.name for p in dry.removed] == [names[1]]
        assert all((tmp_path / name).is_dir() for name in names)  # a dry run removes nothing

        done = deps.prune_working_copies(tmp_path, 2, confirm=True)

        assert [p.name for p in done.kept] == [names[3], names[2]]
        assert done.in_use == (busy,)
        assert [p.name for p in done.removed] == [names[1]]
        assert sorted(p.name for p in tmp_path.iterdir()) == [names[0], names[2], names[3]]
    # Once released, the old directory goes at the next prune.
    assert [p.name for p in deps.prune_working_copies(tmp_path, 2, confirm=True).removed] == [names[0]]
    reused = deps.claim_run_directory(tmp_path, names[3])
    with pytest.raises(deps.DependencyError, match="already exists"), reused:
        pass
    with pytest.raises(ValueError, match="at least 1"):
        deps.prune_working_copies(tmp_path, 0)


def test_image_repository_and_services_on_different_repositories() -> None:
    from tasks.errors import SettingsError
    from tasks.runtime import ServiceStatus

    assert deps.image_repository("docker.io/library/nginx:1.25") == "nginx"
    assert deps.image_repository("registry:5000/team/app:v1") == "registry:5000/team/app"
    assert deps.image_repository("app@sha256:" + "0" * 64) == "app"
    running = [
        ServiceStatus("backend", "app:v1", 1, 1, "running"),
        ServiceStatus("nginx", "nginx:1.25", 1, 1, "running"),
        ServiceStatus("worker", None, 1, 0, "missing"),
    ]
    deps.check_image_against_services("docker.io/app", ["backend"], running, "staging")
    with pytest.raises(
        SettingsError, match=r"backend runs app; nginx runs nginx: .* one tag to every service"
    ):
        deps.check_image_against_services("app", ["backend", "nginx"], running, "staging")
    with pytest.raises(SettingsError, match=r"worker runs no image now"):
        deps.check_image_against_services("app", ["backend", "worker"], running, "staging")
