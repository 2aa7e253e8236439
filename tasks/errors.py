"""Typed errors. Each message says what failed and what to do next; none carries a secret."""

from __future__ import annotations


class OpsError(Exception):
    """Base of every error swagger2mcp-ops raises on purpose."""


class SettingsError(OpsError):
    """A setting is missing or invalid; raised at load, before any side effect."""


class ParameterError(OpsError):
    """A flow parameter is invalid; raised before any side effect."""


class CommandError(OpsError):
    """An external command failed (non-zero exit)."""


class CommandTimeout(CommandError):
    """An external command ran past its timeout and its whole process group was killed."""


class CheckFailed(OpsError):
    """A verification found evidence that something is wrong (health, backup, certificate)."""


class LockBusy(OpsError):
    """Another run holds the lock for the same target."""


class ApprovalRejected(OpsError):
    """A human rejected the approval form, or it timed out; nothing was applied."""
