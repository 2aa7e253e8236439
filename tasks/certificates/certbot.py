"""certbot: the argv of a renewal, its dry run against the ACME server, and the renewal itself.

The decision to renew is made here (:func:`~tasks.certificates.decisions.should_renew`), not by
certbot's own ``renew_before_expiry``; a renewal is proven by the new serial on disk, then by what
the server serves.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tasks.certificates.files import read_lineage, renewal_server
from tasks.commands import CommandResult, run_command
from tasks.errors import CommandError, OpsError
from tasks.runlog import run_logger
from tasks.settings import CertificatesSettings

# certbot's own output is long; reports keep its tail.
_OUTPUT_TAIL = 1500
# Where certbot's log says why the CA refused a challenge (its output only says "Some challenges have
# failed" when run quietly), and how each record of that log starts.
_PROBLEMS_MARKER = "The Certificate Authority reported these problems:"
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+:[A-Z]+:")
_DETAIL_LIMIT = 400


class RenewalFailed(OpsError):
    """certbot could not renew a lineage (or its dry run failed); the certificate on disk is unchanged."""


def certbot_program(cfg: CertificatesSettings) -> str:
    """The certbot to run: the configured path, else the one installed beside this Python, else PATH."""
    if cfg.certbot_path is not None:
        return str(cfg.certbot_path)
    beside = Path(sys.executable).parent / "certbot"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("certbot") or "certbot"


def lineage_server(cfg: CertificatesSettings, cert_name: str) -> str:
    """The ACME server a lineage renews against: the one in its own renewal configuration (the CA
    that issued it), else ``acme_server``; always ``acme_server`` when ``force_acme_server`` is set
    (to move lineages to another CA)."""
    if cfg.force_acme_server:
        return cfg.acme_server
    return renewal_server(cfg.config_dir, cert_name) or cfg.acme_server


def certbot_renew_argv(cfg: CertificatesSettings, cert_name: str, *, dry_run: bool) -> list[str]:
    """``certbot renew`` for one lineage, with everything a non-interactive run needs.

    ``--server`` (:func:`lineage_server`) is given because a dry run ignores the server stored in
    the lineage (certbot itself uses Let's Encrypt's staging server for a dry run of a lineage of
    Let's Encrypt's production server); without
    ``--no-random-sleep-on-renew`` a non-interactive renew sleeps for up to eight minutes. A real renew
    passes ``--force-renewal``: the decision was made by the threshold here, and certbot's own
    (``renew_before_expiry``) would otherwise skip the lineage silently.
    """
    argv = [
        certbot_program(cfg),
        "renew",
        "--cert-name",
        cert_name,
        "--non-interactive",
        "--no-random-sleep-on-renew",
        "--server",
        lineage_server(cfg, cert_name),
        "--config-dir",
        str(cfg.config_dir),
        "--work-dir",
        str(cfg.work_dir),
        "--logs-dir",
        str(cfg.logs_dir),
    ]
    argv.append("--dry-run" if dry_run else "--force-renewal")
    return argv


def certbot_env(cfg: CertificatesSettings) -> dict[str, str]:
    """Environment for certbot: the CA bundle it trusts for the ACME server, when configured."""
    return {"REQUESTS_CA_BUNDLE": str(cfg.acme_ca_bundle)} if cfg.acme_ca_bundle else {}


def _tail(result: CommandResult) -> str:
    return (result.stderr or result.stdout)[-_OUTPUT_TAIL:]


def certbot_reason(output: str) -> str:
    """The line of certbot's output that says why it failed (its output is mostly decoration)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("Failed to renew", "Error", "error", "failed", "Failed"):
        for line in lines:
            if marker in line and not line.startswith("Ask for help"):
                return line
    return lines[-1] if lines else "(no output)"


def challenge_problems(log_text: str) -> str | None:
    """The problems the CA reported for failed challenges, from certbot's log: one
    ``identifier: type: detail`` per failed identifier (connection refused, DNS, 404 on the token...)
    and certbot's hint; None when the log reports no failed challenge."""
    at = log_text.rfind(_PROBLEMS_MARKER)
    if at < 0:
        return None
    problems: list[dict[str, str]] = []
    hint = None
    for line in log_text[at + len(_PROBLEMS_MARKER) :].splitlines():
        if _LOG_RECORD.match(line):
            break
        key, _, value = line.strip().partition(":")
        value = value.strip()[:_DETAIL_LIMIT]
        if key in ("Identifier", "Domain"):  # "Domain" before certbot 4
            problems.append({"identifier": value})
        elif key in ("Type", "Detail") and problems:
            problems[-1][key.lower()] = value
        elif key == "Hint":
            hint = value
    if not problems:
        return None
    text = "; ".join(": ".join(p[k] for k in ("identifier", "type", "detail") if p.get(k)) for p in problems)
    return f"{text} (hint: {hint})" if hint else text


def certbot_log_cause(logs_dir: Path, since: float) -> str | None:
    """Why the CA refused a challenge, from ``logs_dir/letsencrypt.log`` when certbot wrote it at or
    after ``since`` (epoch seconds; certbot starts a new log for each run); None otherwise."""
    log = logs_dir / "letsencrypt.log"
    try:
        if log.stat().st_mtime < since:
            return None
        return challenge_problems(log.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


@dataclass(frozen=True)
class DryRunResult:
    """A ``certbot renew --dry-run`` of one lineage: whether a real renewal would succeed."""

    cert_name: str
    passed: bool
    command: str
    output_tail: str
    duration_seconds: float
    cause: str | None = None  # what the CA reported for a failed challenge, from certbot's log

    @property
    def reason(self) -> str:
        """Why the dry run failed: certbot's own line, and the CA's report of a failed challenge."""
        summary = certbot_reason(self.output_tail)
        return f"{summary} — the CA reported: {self.cause}" if self.cause else summary


def certbot_dry_run(cfg: CertificatesSettings, cert_name: str) -> DryRunResult:
    """Run ``certbot renew --dry-run`` for one lineage against the ACME server; never raises for a failure.

    Raises:
        CommandError: certbot itself is missing or timed out.
    """
    argv = certbot_renew_argv(cfg, cert_name, dry_run=True)
    _require_program(argv[0])
    started = _log_clock()
    result = run_command(argv, env=certbot_env(cfg), timeout=cfg.certbot_timeout_seconds, check=False)
    cause = None if result.ok else certbot_log_cause(cfg.logs_dir, started)
    return DryRunResult(
        cert_name, result.ok, result.command_line, _tail(result), result.duration_seconds, cause
    )


@dataclass(frozen=True)
class RenewalRecord:
    """What renewing one lineage changed (the change record)."""

    cert_name: str
    changed: bool
    old_serial: str
    new_serial: str
    old_not_after: datetime
    new_not_after: datetime
    command: str


def renew_lineage(cfg: CertificatesSettings, cert_name: str) -> RenewalRecord:
    """Renew one lineage with ``certbot renew --cert-name NAME`` and read the new certificate.

    Raises:
        RenewalFailed: certbot failed, or the certificate on disk did not change.
        CertificateFileError: the lineage does not exist.
    """
    before = read_lineage(cfg.config_dir, cert_name)
    argv = certbot_renew_argv(cfg, cert_name, dry_run=False)
    _require_program(argv[0])
    started = _log_clock()
    try:
        result = run_command(argv, env=certbot_env(cfg), timeout=cfg.certbot_timeout_seconds)
    except CommandError as exc:
        cause = certbot_log_cause(cfg.logs_dir, started)
        reported = f" The CA reported: {cause}." if cause else ""
        raise RenewalFailed(
            f"certbot could not renew {cert_name}; the certificate on disk is unchanged (serial"
            f" {before.info.serial}).{reported} Look at {cfg.logs_dir}/letsencrypt.log. certbot said:\n"
            f"{str(exc)[-_OUTPUT_TAIL:]}"
        ) from None
    after = read_lineage(cfg.config_dir, cert_name)
    if after.info.serial == before.info.serial:
        raise RenewalFailed(
            f"certbot exited 0 but {after.path} still holds serial {before.info.serial}; certbot said:\n"
            f"{_tail(result)}"
        )
    run_logger(__name__).info(
        "renewed %s: serial %s -> %s, not after %s",
        cert_name,
        before.info.serial,
        after.info.serial,
        after.info.not_after.isoformat(),
    )
    return RenewalRecord(
        cert_name=cert_name,
        changed=True,
        old_serial=before.info.serial,
        new_serial=after.info.serial,
        old_not_after=before.info.not_after,
        new_not_after=after.info.not_after,
        command=result.command_line,
    )


def _log_clock() -> float:
    """Now, in the file system's clock, a little early: a log written by the run that starts now has
    a modification time at or after it (file times can be coarser than ``time.time()``)."""
    return time.time() - 1.0


def _require_program(program: str) -> None:
    if shutil.which(program) is None:
        raise CommandError(
            f"certbot not found at {program!r}; install certbot or set OPS_CERTIFICATES__CERTBOT_PATH"
        )
