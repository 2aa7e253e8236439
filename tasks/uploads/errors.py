"""The uploads cleanup's errors: each says what failed and what to do."""

from __future__ import annotations

from tasks.errors import OpsError


class UploadsError(OpsError):
    """Base of the uploads cleanup's errors."""


class UploadsRootInvalid(UploadsError):
    """The uploads root is missing or not a directory."""


class UploadsRootRefused(UploadsRootInvalid):
    """The uploads root is a place the cleanup must never scan (the system, the home or project
    directory, a symlink, the cleanup's own storage) or is owned by another than the expected user."""


class QuarantineInvalid(UploadsError):
    """The quarantine directory cannot be used (another filesystem, inside the root...)."""


class ReferenceCheckFailed(UploadsError):
    """The application's database could not say which uploads it references; nothing was removed."""


class PlanInvalid(UploadsError):
    """A plan or manifest file is unreadable or names a path that is not inside the root."""


class QuarantineRunNotFound(UploadsError):
    """No quarantine run has the given id."""
