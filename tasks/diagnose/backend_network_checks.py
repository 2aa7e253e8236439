"""Performance "Network Issues" from where the app stands: TCP reachability of PostgreSQL and Redis and
DNS of the configured names, probed inside a running container or pod of the backend
(:meth:`~tasks.runtime.Runtime.exec`, the runbook's ``kubectl exec deployment/backend -- nc -zv ...``)
and, at the same moment, from the ops host, side by side.

A difference between the two views is a finding of its own: reachable from the ops host but not from
the backend points at a network policy, a firewall or the backend's network; the other way round at a
name or address that only exists in the Compose network or the cluster.

Images carry different tools, so each probe falls back in order (``nc -z``, ``node``, bash's
``/dev/tcp``, a plain ``nc`` connect, ``busybox nc``; ``getent hosts``, ``node``, ``nslookup``,
``busybox nslookup`` for DNS) and says which one answered. A tool the image lacks (or that lacks an
option) is skipped for the rest of the check; when none works, that is a finding, not an error.

Read-only: a probe opens one TCP connection and closes it, or resolves a name. Every command has its
own time limit and the runtime call another; only host names and ports are passed, never a DSN.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.diagnose.model import (
    FLOW_RESTART,
    RB_DATABASE,
    RB_NETWORK,
    RB_REDIS,
    Diagnosis,
    Finding,
    Severity,
)
from tasks.diagnose.system_checks import network_targets, probe_tcp, resolve
from tasks.runtime import (
    ExecResult,
    RuntimeOperationFailed,
    RuntimeUnavailable,
    get_runtime,
)
from tasks.secrets import configured_secrets, mask_text, one_line
from tasks.settings import OpsSettings

CHECK = "network-from-backend"
TITLE = "Reachability and DNS: ops host vs inside the backend"
# What running a command through the runtime's API may add to the probe's own time limit.
EXEC_SLACK_SECONDS = 5.0
OK_MARK = "s2m-ok"
FAIL_MARK = "s2m-fail"

# Runs argv inside the backend with a time limit (Runtime.exec bound to the service).
Run = Callable[[Sequence[str], float], ExecResult]

# --- The probe programs (host and port are arguments, never spliced into the program text) ----------

NODE_TCP = (
    "const net=require('net');const [h,p,t]=process.argv.slice(-3);"
    "const s=net.connect({host:h,port:Number(p)});"
    "s.setTimeout(Number(t)*1000,()=>"
    f"{{console.log('{FAIL_MARK} no answer within '+t+' s');process.exit(1)}});"
    f"s.on('connect',()=>{{console.log('{OK_MARK} connected');s.destroy();process.exit(0)}});"
    f"s.on('error',e=>{{console.log('{FAIL_MARK} '+e.message);process.exit(1)}});"
)
NODE_DNS = (
    "const dns=require('dns');const [h,t]=process.argv.slice(-2);"
    f"setTimeout(()=>{{console.log('{FAIL_MARK} no answer within '+t+' s');process.exit(1)}},"
    "Number(t)*1000).unref();"
    "dns.lookup(h,{all:true},(e,a)=>{"
    f"if(e){{console.log('{FAIL_MARK} '+e.message);process.exit(1)}}"
    f"console.log('{OK_MARK} '+a.map(x=>x.address).join(' '));process.exit(0)}});"
)
# bash opens /dev/tcp/HOST/PORT itself (dash and busybox sh do not); a watchdog bounds the connect,
# which has no timeout of its own.
BASH_TCP = (
    '( exec 3<>"/dev/tcp/$1/$2" ) 2>&1 & p=$!\n'
    "( trap 'kill $s 2>/dev/null; exit 0' TERM; sleep \"$3\" & s=$!; wait $s; kill $p 2>/dev/null ) & w=$!\n"
    'wait "$p"; rc=$?\n'
    'kill "$w" 2>/dev/null\n'
    f'if [ "$rc" = 0 ]; then echo "{OK_MARK} connected"; exit 0; fi\n'
    f'if [ "$rc" -gt 128 ]; then echo "{FAIL_MARK} no answer within $3 s"; exit 1; fi\n'
    f'echo "{FAIL_MARK} connection failed"; exit 1\n'
)

# A tool that exists but cannot do what is asked (busybox nc has no -z, a busybox without the applet).
_UNSUPPORTED = re.compile(
    r"(?i)invalid option|illegal option|unrecognized option|unknown option|usage:|applet not found"
)
_ADDRESS = re.compile(r"^Address(?:\s+\d+)?:\s*(\S+)")


@dataclass(frozen=True)
class View:
    """One target seen from one place: ``ok`` None when it could not be probed there."""

    ok: bool | None
    detail: str
    tool: str | None = None
    addresses: tuple[str, ...] = ()
    latency_ms: float | None = None

    def shown(self) -> str:
        if self.ok is None:
            return f"not probed: {self.detail}"
        if not self.ok:
            return f"FAILED: {self.detail}"
        text = ", ".join(self.addresses) or self.detail
        return text if self.latency_ms is None else f"{text} ({self.latency_ms:g} ms)"


@dataclass(frozen=True)
class Comparison:
    """One target (``tcp``: a service's host:port; ``dns``: a host name) from both places."""

    kind: str
    name: str
    target: str
    host: View
    inside: View

    @property
    def differs(self) -> bool:
        return self.host.ok is not None and self.inside.ok is not None and self.host.ok != self.inside.ok


@dataclass(frozen=True)
class NetworkViewsEvidence:
    """Both views of every target, where the inside view was taken, and the tools that could not help."""

    runtime: str
    service: str | None
    instance: str | None
    comparisons: tuple[Comparison, ...]
    unusable: tuple[str, ...] = ()
    unavailable: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        rows = [
            {
                "kind": c.kind,
                "target": c.target if c.kind == "dns" else f"{c.name} {c.target}",
                "ops_host": c.host.shown(),
                "inside_backend": c.inside.shown(),
                "tool_inside": c.inside.tool,
                "same": "?" if c.inside.ok is None or c.host.ok is None else ("no" if c.differs else "yes"),
            }
            for c in self.comparisons
        ]
        if self.unusable:
            rows.append(
                {
                    "kind": "tools",
                    "target": f"not usable in {self.instance or self.service}",
                    "ops_host": None,
                    "inside_backend": "; ".join(self.unusable),
                    "tool_inside": None,
                    "same": None,
                }
            )
        return rows


# --- Reading each tool's answer: a View, or None when the tool cannot answer here ---------------------


def _text(result: ExecResult) -> str:
    return "\n".join(part for part in (result.stdout.strip(), result.stderr.strip()) if part)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _cannot_run(result: ExecResult) -> bool:
    # 126: found but not executable; 127 (EXIT_NOT_FOUND): not there.
    return result.exit_code in (126, 127) or bool(_UNSUPPORTED.search(_text(result)))


def _why_unusable(result: ExecResult) -> str:
    """The line that says why (``nc: invalid option -- 'z'``), not the end of a usage text."""
    lines = [line.strip() for line in _text(result).splitlines() if line.strip()]
    said = [line for line in lines if _UNSUPPORTED.search(line)]
    return (said or lines or [f"exit status {result.exit_code}"])[0]


def _timed_out(result: ExecResult) -> View:
    return View(False, f"no answer: {result.stderr or 'the command did not end in time'}")


def _read_nc(result: ExecResult) -> View | None:
    if result.timed_out:
        return _timed_out(result)
    if _cannot_run(result):
        return None
    if result.exit_code == 0:
        return View(True, "connected")
    return View(False, _last_line(_text(result)) or f"exit status {result.exit_code}")


def _read_marked(result: ExecResult) -> View | None:
    """The node and bash programs end with one marked line; anything else means the tool is unfit."""
    if result.timed_out:
        return _timed_out(result)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index]
        if line.startswith(OK_MARK):
            rest = line[len(OK_MARK) :].strip()
            return View(True, rest or "ok", addresses=tuple(rest.split()) if rest != "connected" else ())
        if line.startswith(FAIL_MARK):
            before = [ln for ln in lines[:index] if not ln.startswith(OK_MARK)]
            reason = line[len(FAIL_MARK) :].strip()
            return View(False, f"{reason}: {before[-1]}" if before else reason)
    return None


def _read_getent(result: ExecResult) -> View | None:
    if result.timed_out:
        return _timed_out(result)
    if _cannot_run(result):
        return None
    if result.exit_code == 2:  # getent: key not found
        return View(False, "not found")
    if result.exit_code != 0:
        return View(False, _last_line(_text(result)) or f"exit status {result.exit_code}")
    addresses = tuple(dict.fromkeys(line.split()[0] for line in result.stdout.splitlines() if line.split()))
    return View(True, "resolved", addresses=addresses) if addresses else View(False, "no address")


def _read_nslookup(result: ExecResult) -> View | None:
    if result.timed_out:
        return _timed_out(result)
    if _cannot_run(result):
        return None
    addresses: list[str] = []
    answer = False  # the lines before the first "Name:" are about the DNS server itself
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("Name:"):
            answer = True
        elif answer and (match := _ADDRESS.match(line)):
            addresses.append(match[1])
    if addresses:
        return View(True, "resolved", addresses=tuple(dict.fromkeys(addresses)))
    failed = [ln for ln in _text(result).splitlines() if re.search(r"can't|NXDOMAIN|timed out", ln)]
    return View(False, (failed[-1] if failed else _last_line(_text(result))).strip() or "no address")


@dataclass(frozen=True)
class Tool:
    """One way of probing: its name in the report, its argv for a target, how its answer reads."""

    name: str
    argv: Callable[[tuple[str, ...], str], list[str]]
    read: Callable[[ExecResult], View | None]


TCP_TOOLS = (
    Tool("nc -z", lambda t, s: ["nc", "-z", "-v", "-w", s, t[0], t[1]], _read_nc),
    Tool("node", lambda t, s: ["node", "-e", NODE_TCP, t[0], t[1], s], _read_marked),
    Tool("bash /dev/tcp", lambda t, s: ["bash", "-c", BASH_TCP, "s2m-probe", t[0], t[1], s], _read_marked),
    # nc without -z (busybox's): connect, send nothing; PostgreSQL and Redis close on the empty input.
    Tool("nc", lambda t, s: ["nc", "-w", s, t[0], t[1]], _read_nc),
    Tool("busybox nc", lambda t, s: ["busybox", "nc", "-w", s, t[0], t[1]], _read_nc),
)
DNS_TOOLS = (
    Tool("getent hosts", lambda t, s: ["getent", "hosts", t[0]], _read_getent),
    Tool("node", lambda t, s: ["node", "-e", NODE_DNS, t[0], s], _read_marked),
    # nslookup asks the DNS server only: names from /etc/hosts do not resolve through it.
    Tool("nslookup", lambda t, s: ["nslookup", t[0]], _read_nslookup),
    Tool("busybox nslookup", lambda t, s: ["busybox", "nslookup", t[0]], _read_nslookup),
)


class InsideProbes:
    """Probes run through ``run``, each with the first tool that answers; what cannot help is remembered."""

    def __init__(self, run: Run, timeout: float, deadline: float, secrets: Sequence[str] = ()) -> None:
        self.run = run
        self.timeout = timeout
        self.deadline = deadline
        self.secrets = list(secrets)
        self.unusable: dict[str, str] = {}
        self.missing: set[str] = set()  # commands the image does not have
        self.broken: str | None = None  # the runtime could not run commands any more
        self.instance: str | None = None

    def tcp(self, host: str, port: int) -> View:
        return self._first(TCP_TOOLS, (host, str(port)))

    def dns(self, host: str) -> View:
        return self._first(DNS_TOOLS, (host,))

    def _first(self, tools: Sequence[Tool], target: tuple[str, ...]) -> View:
        seconds = str(max(1, math.ceil(self.timeout)))
        for tool in tools:
            if self.broken is not None:
                return View(None, self.broken)
            if tool.name in self.unusable:
                continue
            argv = tool.argv(target, seconds)
            if argv[0] in self.missing:
                self.unusable[tool.name] = f"no {argv[0]}"
                continue
            remaining = self.deadline - time.monotonic()
            if remaining < 0.5:
                return View(None, "the check's time ran out before this probe")
            try:
                result = self.run(argv, min(self.timeout + EXEC_SLACK_SECONDS, remaining))
            except (RuntimeOperationFailed, RuntimeUnavailable) as exc:
                self.broken = self._masked(str(exc))
                return View(None, self.broken)
            self.instance = self.instance or result.instance
            view = tool.read(result)
            if view is None:
                if result.not_found:
                    self.missing.add(argv[0])
                    self.unusable[tool.name] = f"no {argv[0]}"
                else:
                    self.unusable[tool.name] = self._masked(_why_unusable(result))
                continue
            return dataclasses.replace(view, tool=tool.name, detail=self._masked(view.detail))
        tried = ", ".join(t.name for t in tools)
        return View(None, f"no tool in the image could probe this (tried {tried})")

    def _masked(self, text: str) -> str:
        return mask_text(one_line(text, 300), self.secrets)


# --- The check ----------------------------------------------------------------------------------


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def backend_service(settings: OpsSettings) -> str | None:
    """The service the inside view is taken from: ``diagnose.backend_service``, else the first service."""
    services = settings.runtime.services
    return settings.diagnose.backend_service or (services[0] if services else None)


def network_views(
    settings: OpsSettings,
    run: Run | None,
    service: str | None,
    runtime_kind: str,
    unavailable: str | None = None,
) -> Diagnosis:
    """Probe every target from the ops host and through ``run`` (inside ``service``), and compare.

    ``run`` None (with ``unavailable`` saying why) takes the ops host's view only.
    """
    limits = settings.diagnose
    timeout = limits.network_timeout_seconds
    # Leave the runner's deadline some room, so that what was gathered is reported, not lost.
    deadline = time.monotonic() + max(1.0, limits.check_deadline_seconds - 2.0)
    secrets = configured_secrets(settings)
    tcp_targets, hosts = network_targets(settings)
    names = [h for h in hosts if not _is_address(h)]
    probes = InsideProbes(run, timeout, deadline, secrets) if run is not None else None

    not_taken = View(None, unavailable or "no runtime")
    comparisons: list[Comparison] = []
    for name, host, port in tcp_targets:
        seen = probe_tcp(name, host, port, timeout)
        detail = "connected" if seen.ok else mask_text(str(seen.error), secrets)
        host_view = View(seen.ok, detail, "socket", (), seen.latency_ms)
        inside_view = probes.tcp(host, port) if probes is not None else not_taken
        comparisons.append(Comparison("tcp", name, f"{host}:{port}", host_view, inside_view))
    for host in names:
        lookup = resolve(host, timeout)
        host_view = View(
            lookup.error is None,
            "resolved" if lookup.error is None else mask_text(lookup.error, secrets),
            "getaddrinfo",
            lookup.addresses,
        )
        inside_view = probes.dns(host) if probes is not None else not_taken
        comparisons.append(Comparison("dns", host, host, host_view, inside_view))
    evidence = NetworkViewsEvidence(
        runtime=runtime_kind,
        service=service,
        instance=probes.instance if probes is not None else None,
        comparisons=tuple(comparisons),
        unusable=tuple(f"{tool} ({why})" for tool, why in (probes.unusable if probes else {}).items()),
        unavailable=unavailable if probes is None else probes.broken,
    )
    where = f"inside {service}" + (f" ({evidence.instance})" if evidence.instance else "")
    title = f"Reachability and DNS: ops host vs {where}" if service else TITLE
    return Diagnosis(CHECK, title, evidence, tuple(network_view_findings(evidence)))


def network_from_backend(settings: OpsSettings) -> Diagnosis:
    """Runbook "Network Issues" from the backend: TCP to PostgreSQL and Redis and DNS of the configured
    names, inside a running container or pod of the backend and from the ops host, compared.

    Without a runtime (``runtime.kind = "none"``) or a running backend, the ops host's view is taken
    alone and the report says why the other is missing.
    """
    service = backend_service(settings)
    runtime = get_runtime(settings)
    if runtime.kind == "none":
        return network_views(
            settings, None, service, runtime.kind, "runtime.kind is 'none': no container to run probes in"
        )
    if service is None:
        return network_views(settings, None, None, runtime.kind, "no service configured (runtime.services)")
    bound = service

    def run(argv: Sequence[str], timeout: float) -> ExecResult:
        return runtime.exec(bound, argv, timeout)

    return network_views(settings, run, service, runtime.kind)


# --- Findings -----------------------------------------------------------------------------------

_POLICY_CAUSE = (
    "Likely a network policy or firewall between the backend and {name}, or the backend on another"
    " network. Check Kubernetes NetworkPolicies (egress of the backend, ingress of {name}), the Compose"
    " networks the backend joins, security groups; then from inside: `nc -zv {target}`"
)


def _service_runbook(name: str) -> str:
    return {"postgres": RB_DATABASE, "redis": RB_REDIS}.get(name, RB_NETWORK)


def network_view_findings(evidence: NetworkViewsEvidence) -> list[Finding]:
    """Differences between the two views, failures both see, and an inside view that could not be taken."""
    where = f"inside {evidence.service}" + (f" ({evidence.instance})" if evidence.instance else "")
    findings: list[Finding] = []
    if evidence.unavailable is not None:
        no_runtime = evidence.runtime == "none" or evidence.service is None
        findings.append(
            Finding(
                CHECK,
                Severity.INFO if no_runtime else Severity.WARNING,
                f"the backend's own view was not taken: {evidence.unavailable}",
                RB_NETWORK,
                "Set runtime.kind and diagnose.backend_service to compare with the backend's view, or check"
                " by hand from inside it (`nc -zv <host> <port>`)"
                if no_runtime
                else "Start the backend (or check runtime.services / diagnose.backend_service), then run"
                " diagnose again",
                None if no_runtime else FLOW_RESTART,
            )
        )
    for kind in ("tcp", "dns"):
        unprobed = [c for c in evidence.comparisons if c.kind == kind and c.inside.ok is None]
        if unprobed and evidence.unavailable is None:
            what = "TCP reachability" if kind == "tcp" else "DNS resolution"
            findings.append(
                Finding(
                    CHECK,
                    Severity.WARNING,
                    f"{what} could not be checked {where}: {unprobed[0].inside.detail}",
                    RB_NETWORK,
                    "Check by hand from inside the backend, or give its image a probe tool (netcat, busybox,"
                    " getent); the ops host's view is in the table",
                    None,
                )
            )
    for c in evidence.comparisons:
        finding = _tcp_finding(c, where) if c.kind == "tcp" else _dns_finding(c, where)
        if finding is not None:
            findings.append(finding)
    if not findings:
        tools = sorted({c.inside.tool for c in evidence.comparisons if c.inside.tool})
        findings.append(
            Finding(
                CHECK,
                Severity.OK,
                f"{len(evidence.comparisons)} targets seen the same from the ops host and {where}"
                + (f" (probed with {', '.join(tools)})" if tools else ""),
                RB_NETWORK,
            )
        )
    return findings


def _tcp_finding(c: Comparison, where: str) -> Finding | None:
    label = f"{c.name} at {c.target}"
    tool = f" (probed with {c.inside.tool})" if c.inside.tool else ""
    if c.host.ok and c.inside.ok is False:
        return Finding(
            CHECK,
            Severity.CRITICAL,
            f"{label} is reachable from the ops host but not {where}{tool}: {c.inside.detail}",
            RB_NETWORK,
            _POLICY_CAUSE.format(name=c.name, target=c.target.replace(":", " ")),
            None,
        )
    if c.host.ok is False and c.inside.ok:
        return Finding(
            CHECK,
            Severity.INFO,
            f"{label} is reachable {where}{tool} but not from the ops host ({c.host.detail}): an address of"
            " the Compose network or the cluster; the app is not affected",
            RB_NETWORK,
            "Nothing to fix for the app; for the ops host's own checks run the ops worker in that network"
            " or give it an address it can reach",
            None,
        )
    if c.host.ok is False and c.inside.ok is False:
        return Finding(
            CHECK,
            Severity.CRITICAL,
            f"{label} is reachable neither from the ops host nor {where}{tool}: {c.inside.detail}",
            _service_runbook(c.name),
            f"{c.name} is likely down or not listening on {c.target}: check it and restart it",
            FLOW_RESTART,
        )
    return None


def _dns_finding(c: Comparison, where: str) -> Finding | None:
    tool = f" (looked up with {c.inside.tool})" if c.inside.tool else ""
    if c.host.ok and c.inside.ok is False:
        return Finding(
            CHECK,
            Severity.CRITICAL,
            f"{c.name} resolves on the ops host ({', '.join(c.host.addresses)}) but not {where}{tool}:"
            f" {c.inside.detail}",
            RB_NETWORK,
            "DNS inside the backend: check the cluster DNS (CoreDNS pods, the pod's dnsPolicy and search"
            " domains) or the Compose network's DNS and service names; use a name the backend's network"
            " knows",
            None,
        )
    if c.host.ok is False and c.inside.ok:
        return Finding(
            CHECK,
            Severity.INFO,
            f"{c.name} resolves {where}{tool} ({', '.join(c.inside.addresses)}) but not on the ops host:"
            " a service name of the Compose network or the cluster; the app is not affected",
            RB_NETWORK,
            "Nothing to fix for the app; the ops host's DNS failures for this name are expected outside"
            " that network",
            None,
        )
    if c.host.ok is False and c.inside.ok is False:
        return Finding(
            CHECK,
            Severity.CRITICAL,
            f"{c.name} resolves neither on the ops host nor {where}{tool}: {c.inside.detail}",
            RB_NETWORK,
            "Check the name in the settings (DSN, Redis URL, diagnose.resolve_hosts) and its DNS records",
            None,
        )
    if c.host.ok and c.inside.ok and not set(c.host.addresses) & set(c.inside.addresses):
        return Finding(
            CHECK,
            Severity.INFO,
            f"{c.name} resolves to other addresses {where} ({', '.join(c.inside.addresses)}) than on the"
            f" ops host ({', '.join(c.host.addresses)}): split DNS or a hosts entry; the ops checks may not"
            " reach the server the app uses",
            RB_NETWORK,
            "Check which address is the right one, and the backend's /etc/hosts and DNS",
            None,
        )
    return None
