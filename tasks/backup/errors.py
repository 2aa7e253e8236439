"""The errors of backups, verification, restore and pruning: each says what failed and what to do."""

from __future__ import annotations

from tasks.errors import CheckFailed, OpsError


class BackupError(OpsError):
    """A backup, verification, restore or prune could not be done."""


class BackupNotFound(BackupError):
    """No backup matches the id (or no backup exists yet)."""


class BackupNotVerified(BackupError):
    """No backup has passed the verification level asked for."""


class ManifestUnreadable(BackupError):
    """A manifest exists but does not parse (cut short, or written by a newer version)."""


class BackupCorrupt(CheckFailed):
    """The stored object does not match its manifest (size or sha256), or does not restore."""


class DatabaseNotFound(BackupError):
    """The database to back up or restore into does not exist."""


class RestoreFailed(BackupError):
    """The restore did not complete; the target database was left as it was."""
