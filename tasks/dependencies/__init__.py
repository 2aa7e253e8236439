"""npm dependency updates as plain functions: audit, outdated, working copy, update, test, commit, build.

Everything happens in a working copy made from the application's live checkout (a ``git clone`` of it,
or a copy plus ``git init`` when it is not a repository); the live checkout is only read. npm runs with
a userconfig of our own in the run directory (never the operator's ``~/.npmrc``): the registry URL and
its token come from settings, the token through an environment variable, so it is masked in every log,
record and error. Every command runs through :mod:`tasks.commands` with its own timeout.

Where things are:

- ``environment``: scopes, severities, the errors, :class:`NpmEnvironment` (how npm and git run);
- ``advisories``: ``npm audit`` parsed, and two audits compared;
- ``versions``: version ranges (the node-semver subset advisories use), ``npm outdated``, published
  versions;
- ``lockfile``: reading lockfiles and diffing them;
- ``working_copy``: the run directory, making the working copy and ``npm ci`` in it, and retention
  of old run directories;
- ``planning``: the npm commands each scope needs (``security``, ``minor``, ``latest``);
- ``apply``: running the plan, the app's tests and the commit in the working copy;
- ``builds``: the image built from the working copy, tagged from the lockfile, and the check that
  staging's services run the repository it is built under;
- ``prefect_tasks``: the Prefect tasks the update-dependencies flow calls.

Import the names below from this package; the modules are how the code is organised, not an API.
"""

from tasks.dependencies.advisories import (
    Advisory,
    AdvisoryDelta,
    AuditReport,
    VulnerablePackage,
    audit,
    compare_audits,
    parse_audit,
)
from tasks.dependencies.apply import (
    CommitRecord,
    TestRun,
    UpdateResult,
    apply_updates,
    commit_update,
    run_tests,
)
from tasks.dependencies.builds import (
    DEFAULT_BUILD_ARGV,
    BuildFailed,
    BuildResult,
    build_command,
    build_image,
    check_image_against_services,
    check_staging_image,
    docker_available,
    image_id,
    image_repository,
    tag_for_lockfile,
)
from tasks.dependencies.environment import (
    LOCKFILES,
    SCOPES,
    SEVERITIES,
    TOKEN_ENV,
    DependencyError,
    NpmEnvironment,
    Scope,
    TestsFailed,
    ensure_tools,
    json_output,
    npm_environment,
)
from tasks.dependencies.lockfile import (
    LockChange,
    diff_lockfiles,
    direct_dependencies,
    installed_version,
    lock_packages,
    lockfile_sha,
    read_lockfile,
)
from tasks.dependencies.planning import (
    UpdateAction,
    UpdatePlan,
    lowest_fixed_version,
    plan_for_scope,
    plan_updates,
)
from tasks.dependencies.prefect_tasks import (
    apply_updates_task,
    audit_task,
    build_image_task,
    check_staging_image_task,
    commit_update_task,
    create_working_copy_task,
    install_task,
    outdated_task,
    plan_for_scope_task,
    prune_working_copies_task,
    run_tests_task,
)
from tasks.dependencies.versions import (
    OutdatedPackage,
    outdated,
    parse_outdated,
    parse_version,
    published_versions,
    satisfies,
)
from tasks.dependencies.working_copy import (
    RUN_MARKER,
    WorkingCopy,
    WorkingCopyPrune,
    check_source,
    claim_run_directory,
    create_working_copy,
    install,
    prune_working_copies,
    run_directory_name,
)

__all__ = [
    "DEFAULT_BUILD_ARGV",
    "LOCKFILES",
    "RUN_MARKER",
    "SCOPES",
    "SEVERITIES",
    "TOKEN_ENV",
    "Advisory",
    "AdvisoryDelta",
    "AuditReport",
    "BuildFailed",
    "BuildResult",
    "CommitRecord",
    "DependencyError",
    "LockChange",
    "NpmEnvironment",
    "OutdatedPackage",
    "Scope",
    "TestRun",
    "TestsFailed",
    "UpdateAction",
    "UpdatePlan",
    "UpdateResult",
    "VulnerablePackage",
    "WorkingCopy",
    "WorkingCopyPrune",
    "apply_updates",
    "apply_updates_task",
    "audit",
    "audit_task",
    "build_command",
    "build_image",
    "build_image_task",
    "check_image_against_services",
    "check_source",
    "check_staging_image",
    "check_staging_image_task",
    "claim_run_directory",
    "commit_update",
    "commit_update_task",
    "compare_audits",
    "create_working_copy",
    "create_working_copy_task",
    "diff_lockfiles",
    "direct_dependencies",
    "docker_available",
    "ensure_tools",
    "image_id",
    "image_repository",
    "install",
    "install_task",
    "installed_version",
    "json_output",
    "lock_packages",
    "lockfile_sha",
    "lowest_fixed_version",
    "npm_environment",
    "outdated",
    "outdated_task",
    "parse_audit",
    "parse_outdated",
    "parse_version",
    "plan_for_scope",
    "plan_for_scope_task",
    "plan_updates",
    "prune_working_copies",
    "prune_working_copies_task",
    "published_versions",
    "read_lockfile",
    "run_directory_name",
    "run_tests",
    "run_tests_task",
    "satisfies",
    "tag_for_lockfile",
]
