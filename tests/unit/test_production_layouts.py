"""The production layouts as files: Kubernetes manifests load into the official client's models, the
flow runs' Role grants exactly the API calls the code makes, the base job template renders with the
image, the per-pool prefect.yaml keeps one deployment list, the systemd units stop in time (the
server's runs the Compose server's command), the Compose layout requires API auth, and no committed
layout file carries a secret value."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from deployments.pools import UnknownPool, for_pool
from deployments.serve import PREFECT_YAML

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
# The code whose API calls the flow runs' Role must allow (KubernetesRuntime, the secret store).
RBAC_SOURCES = [
    *sorted((ROOT / "tasks" / "kubernetes").glob("*.py")),
    *sorted((ROOT / "tasks" / "incidents").glob("*.py")),
]
API_GROUPS = {
    "deployments": "apps",
    "replicasets": "apps",
    "pods": "",
    "secrets": "",
    "networkpolicies": "networking.k8s.io",
}
PLURALS = {"networkpolicy": "networkpolicies"}
VERBS = {"read": "get", "list": "list", "patch": "patch", "create": "create", "delete": "delete"}
SUBRESOURCES = {"scale": "scale", "log": "log"}


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def load_model(doc: dict[str, Any]) -> Any:
    """The client's model of ``doc``; a field the model does not know fails (the client drops them)."""
    api = client.ApiClient()
    version = doc["apiVersion"].split("/")[-1].capitalize()
    model = api._ApiClient__deserialize(doc, f"{version}{doc['kind']}")  # type: ignore[attr-defined]
    assert _strip_none(api.sanitize_for_serialization(model)) == _strip_none(doc), (
        f"{doc['kind']}/{doc['metadata']['name']} has fields the {version}{doc['kind']} model does not know"
    )
    return model


def test_every_manifest_loads_into_the_official_models() -> None:
    docs = manifests()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ServiceAccount",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Deployment",
            # The WAL archiver's example (wal-archiver.yaml), beside the worker's layout.
            "PersistentVolumeClaim",
            "Deployment",
        ]
    )
    for doc in docs:
        load_model(doc)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).exists(), resource
    for generator in kustomization["configMapGenerator"]:
        for name in generator["files"]:
            assert (K8S / name).exists(), name


def api_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every Kubernetes client call in RBAC_SOURCES."""
    calls: set[tuple[str, str, str]] = set()
    pattern = re.compile(r"^(read|list|patch|create|delete|replace)_namespaced_([a-z_]+)$")
    for path in RBAC_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            # pods/exec is passed to stream() rather than called: a websocket GET, authorized as
            # `create` since Kubernetes 1.30 and as `get` before.
            if isinstance(node, ast.Attribute) and node.attr == "connect_get_namespaced_pod_exec":
                calls |= {("", "pods/exec", "create"), ("", "pods/exec", "get")}
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            match = pattern.match(node.func.attr)
            if not match:
                continue
            verb, name = VERBS[match.group(1)], match.group(2)
            if name == "custom_object":
                group, plural = ast.literal_eval(node.args[0]), ast.literal_eval(node.args[3])
                calls.add((group, plural, verb))
                continue
            sub = next((s for s in SUBRESOURCES if name.endswith("_" + s)), None)
            base = name.removesuffix("_" + sub) if sub else name
            resource = PLURALS.get(base.replace("_", ""), base.replace("_", "") + "s")
            assert resource in API_GROUPS, f"{path.name}: {node.func.attr}: add its API group to the test"
            calls.add((API_GROUPS[resource], f"{resource}/{sub}" if sub else resource, verb))
    return calls


def test_the_runs_role_allows_every_call_the_code_makes_and_nothing_more() -> None:
    calls = api_calls()
    # The walk found the calls (an empty set would pass anything).
    assert ("apps", "deployments", "patch") in calls
    assert ("", "secrets", "patch") in calls
    role = next(
        d for d in manifests() if d["kind"] == "Role" and d["metadata"]["name"] == "swagger2mcp-ops-runs"
    )
    assert role["metadata"]["namespace"] == "swagger2mcp"  # the app's namespace, not cluster-wide
    granted: set[tuple[str, str, str]] = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
        if "secrets" in rule["resources"]:
            # Only the one Secret rotation patches.
            assert rule.get("resourceNames") == ["swagger2mcp-app"]
    assert calls - granted == set(), f"calls the Role does not allow: {sorted(calls - granted)}"
    assert granted - calls == set(), f"granted but never called: {sorted(granted - calls)}"
    binding = next(
        d
        for d in manifests()
        if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "swagger2mcp-ops-runs"
    )
    job_defaults = json.loads((K8S / "base-job-template.json").read_text())["variables"]["properties"]
    assert binding["subjects"][0]["name"] == job_defaults["service_account_name"]["default"]


def test_the_base_job_template_renders_a_job_with_the_image() -> None:
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "base-job-template.json").read_text())
    values = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    values.update(
        {
            "image": "registry.example.com/swagger2mcp-ops:0.1.0",
            "name": "backup-run",
            "command": "prefect flow-run execute",
            "env": {"PREFECT_TASKS_DEFAULT_NO_CACHE": "true"},
            "labels": {"app": "swagger2mcp-ops"},
        }
    )
    rendered = apply_values(template["job_configuration"], values)
    job = rendered["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/swagger2mcp-ops:0.1.0"
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "swagger2mcp-ops-runs"
    # The worker fills command/env into the container itself; the rest must be a valid Job.
    container["args"] = container["args"].split()
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    job["metadata"]["name"] = "backup-run-x"
    del job["metadata"]["generateName"]
    load_model(job)


def test_one_deployment_list_for_every_pool() -> None:
    document = yaml.safe_load(PREFECT_YAML.read_text())
    process = for_pool(document, "process")
    for pool in ("docker", "kubernetes"):
        other = for_pool(document, pool, image="registry.example.com/swagger2mcp-ops:9.9.9")
        assert len(other["deployments"]) == len(document["deployments"])
        for mine, base in zip(other["deployments"], process["deployments"], strict=True):
            assert {k: v for k, v in mine.items() if k != "work_pool"} == {
                k: v for k, v in base.items() if k != "work_pool"
            }
            assert mine["work_pool"]["name"] == document["definitions"]["work_pools"][pool]["name"]
            variables = mine["work_pool"]["job_variables"]
            assert variables["image"] == "registry.example.com/swagger2mcp-ops:9.9.9"
            assert variables["env"] == base["work_pool"]["job_variables"]["env"]
        assert other["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"
    assert process["deployments"][0]["work_pool"]["name"] == "swagger2mcp-ops"
    with pytest.raises(UnknownPool, match="no work pool 'ecs'"):
        for_pool(document, "ecs")
    with pytest.raises(UnknownPool, match="runs no image"):
        for_pool(document, "process", image="x:1")
    # The generator does not change the document it was given.
    assert yaml.safe_load(PREFECT_YAML.read_text()) == document


def test_a_hosts_job_variables_merge_over_the_docker_pool() -> None:
    document = yaml.safe_load(PREFECT_YAML.read_text())
    own = {
        "network_mode": "host",
        "networks": [],
        "image_pull_policy": "Never",
        "env": {"OPS_STORAGE__URL": "file:///var/lib/swagger2mcp-ops/backups"},
    }
    result = for_pool(document, "docker", image="swagger2mcp-ops:0.1.0", job_variables=own)
    for deployment in result["deployments"]:
        variables = deployment["work_pool"]["job_variables"]
        assert variables["network_mode"] == "host"
        assert variables["networks"] == []  # replaced, not appended to
        assert variables["image_pull_policy"] == "Never"
        assert variables["image"] == "swagger2mcp-ops:0.1.0"
        assert (
            variables["volumes"]
            == document["definitions"]["work_pools"]["docker"]["job_variables"]["volumes"]
        )
        # The host's env and each deployment's own env, both.
        assert variables["env"]["OPS_STORAGE__URL"] == "file:///var/lib/swagger2mcp-ops/backups"
        assert variables["env"]["PREFECT_TASKS_DEFAULT_NO_CACHE"] == "true"


def test_the_systemd_unit_runs_a_process_worker_that_stops_in_time() -> None:
    unit = (ROOT / "deploy" / "systemd" / "swagger2mcp-ops-worker.service").read_text()
    assert "ExecStart=/opt/swagger2mcp-ops/.venv/bin/prefect worker start --pool swagger2mcp-ops" in unit
    assert re.search(r"^TimeoutStopSec=10$", unit, re.M)
    assert re.search(r"^EnvironmentFile=/etc/swagger2mcp-ops/worker.env$", unit, re.M)
    assert re.search(r"^User=swagger2mcp-ops$", unit, re.M)
    if shutil.which("systemd-analyze"):
        result = subprocess.run(
            [
                "systemd-analyze",
                "verify",
                "--man=no",
                str(ROOT / "deploy/systemd/swagger2mcp-ops-worker.service"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        # Missing user/paths on this machine are expected; a syntax error is not.
        assert "Unknown key" not in result.stderr
        assert "Unknown section" not in result.stderr


# Committed layout files hold no secret: names that carry one have a placeholder value only.
SECRET_NAME = re.compile(
    r"PASSWORD|PASSWD|AUTH_STRING|TOKEN|SECRET|ACCESS_KEY|API_KEY|PRIVATE_KEY|ROUTING_KEY", re.I
)
# KEY=value, KEY: value, "KEY": value; overlapping, so Environment=KEY=value is seen twice.
ASSIGNMENT = re.compile(
    r"(?<![A-Za-z0-9_])(?=([A-Za-z_][A-Za-z0-9_]*)\"?[ \t]*(?:=|:(?:[ \t]|$))[ \t]*"
    r"(\"[^\"]*\"|'[^']*'|[^\s,}\]]*))",
    re.M,
)
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@'\"]*:([^\s@/'\"]+)@")
LAYOUT_FILES = [
    *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix not in {".crt", ".pem"}),
    ROOT / "prefect.yaml",
    ROOT / "automations.yaml",
    ROOT / "Dockerfile",
]


def _placeholder(value: str) -> bool:
    value = value.strip().strip("'\"")
    return (
        value == ""
        or value.startswith(("${", "{{", "{", "[", "<"))
        or "..." in value
        or value.lower() in {"true", "false", "null", "none"}
    )


def secret_values(text: str) -> list[str]:
    """The secret-looking values of ``text`` that are not placeholders (``${VAR}``, ``<...>``, empty)."""
    found = [
        f"{m.group(1)}={m.group(2)}"
        for m in ASSIGNMENT.finditer(text)
        if SECRET_NAME.search(m.group(1)) and not _placeholder(m.group(2))
    ]
    found += [m.group(0) for m in URL_PASSWORD.finditer(text) if not _placeholder(m.group(1))]
    return found


def test_the_committed_layout_files_carry_no_secret_values() -> None:
    # The check itself finds what a leaked secret looks like in each kind of file.
    leaks = {
        "PREFECT_SERVER_API_AUTH_STRING=ops:hunter2": 1,
        '      PREFECT_API_AUTH_STRING: "ops:hunter2"': 1,
        "Environment=PREFECT_API_AUTH_STRING=ops:hunter2": 1,
        '  "token": "hunter2"': 1,
        "ENV OPS_REDIS__URL=redis://:hunter2@redis:6379/0": 1,
        "PREFECT_API_DATABASE_CONNECTION_URL: postgresql+asyncpg://prefect:hunter2@db/prefect": 1,
        "PREFECT_SERVER_API_AUTH_STRING: ${PREFECT_SERVER_API_AUTH_STRING:?set it}": 0,
        "--from-literal=PREFECT_API_AUTH_STRING='ops:...'": 0,
        "postgresql://replicator:<password>@postgres:5432/postgres": 0,
        "postgresql+asyncpg://prefect:${PREFECT_DB_PASSWORD}@prefect-db:5432/prefect": 0,
        "- secretRef:\n    name: swagger2mcp-ops-prefect": 0,
    }
    for text, count in leaks.items():
        assert len(secret_values(text)) == count, (text, secret_values(text))
    assert len(LAYOUT_FILES) > 10
    for path in LAYOUT_FILES:
        assert secret_values(path.read_text()) == [], path
    # The env file the layout reads is never committed; its example names every secret, empty.
    example = {
        k: v
        for k, _, v in (
            line.partition("=")
            for line in (ROOT / "deploy/compose/prefect.env.example").read_text().splitlines()
            if line and not line.startswith("#")
        )
    }
    assert example["PREFECT_DB_PASSWORD"] == example["PREFECT_SERVER_API_AUTH_STRING"] == ""
    assert "deploy/compose/prefect.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_compose_layout_requires_api_auth_on_the_server_and_its_workers() -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose/compose.yaml").read_text())
    server = compose["services"]["prefect-server"]
    worker = compose["services"]["worker"]
    # The server does not start without the credentials (Compose's ${VAR:?...}).
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith(
        "${PREFECT_SERVER_API_AUTH_STRING:?"
    )
    assert worker["environment"]["PREFECT_API_AUTH_STRING"] == "${PREFECT_SERVER_API_AUTH_STRING}"
    assert worker["environment"]["PREFECT_API_URL"].endswith("/api")
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server["ports"] == ["127.0.0.1:4200:4200"]


def test_the_systemd_server_unit_runs_the_compose_servers_command() -> None:
    unit = (ROOT / "deploy" / "systemd" / "swagger2mcp-ops-server.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert exec_start is not None
    argv = exec_start.group(1).split()
    compose = yaml.safe_load((ROOT / "deploy/compose/compose.yaml").read_text())
    command = list(compose["services"]["prefect-server"]["command"])
    command[command.index("--host") + 1] = "127.0.0.1"  # no proxy network on a single host
    assert argv == ["/opt/swagger2mcp-ops/.venv/bin/prefect", *command[1:]]
    assert re.search(r"^EnvironmentFile=/etc/swagger2mcp-ops/server.env$", unit, re.M)
    assert re.search(r"^TimeoutStopSec=10$", unit, re.M)
    # The env file holds the database URL and the credentials the Compose server gets.
    server_env = set(compose["services"]["prefect-server"]["environment"]) - {
        "PREFECT_SERVER_ANALYTICS_ENABLED"
    }
    for name in server_env:
        assert f"#   {name}=" in unit, name
    if shutil.which("systemd-analyze"):
        result = subprocess.run(
            [
                "systemd-analyze",
                "verify",
                "--man=no",
                str(ROOT / "deploy/systemd/swagger2mcp-ops-server.service"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "Unknown key" not in result.stderr
        assert "Unknown section" not in result.stderr
