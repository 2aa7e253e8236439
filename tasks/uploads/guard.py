"""The uploads root's guard rules, checked before anything below the root is read, and the runbook's
owner/mode check of the root."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.settings import StorageSettings, UploadsSettings
from tasks.uploads.errors import UploadsRootInvalid, UploadsRootRefused
from tasks.uploads.locations import _inside, plan_directory, quarantine_directory

# Where the code of this project lives: a root that is it or holds it would put the code in the plan.
PROJECT_DIR = Path(__file__).resolve().parents[2]


# Directories of the system or of many users. A root that is one of them or an ancestor of one
# (``/`` holds them all) is refused; directories below them (/var/lib/app/uploads) stay allowed.
SYSTEM_DIRECTORIES = tuple(
    Path(p)
    for group in (
        ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found"),
        ("/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/usr"),
        ("/var", "/tmp", "/dev/shm", "/var/tmp", "/run/user"),  # noqa: S108  # refused, never written
        ("/usr/bin", "/usr/include", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/sbin"),
        ("/usr/share", "/usr/src", "/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/lock"),
        ("/var/log", "/var/mail", "/var/opt", "/var/run", "/var/spool", "/var/www"),
    )
    for p in group
)
# Trees that belong to the system as a whole: nothing below them is ever an app's uploads directory
# (a root such as /etc/ssl or /usr/lib/python3 is refused too, not only the directories themselves).
SYSTEM_TREES = tuple(
    Path(p) for p in ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc")
) + tuple(Path(p) for p in ("/sbin", "/sys", "/usr", "/run"))
_ROOT_FIX = (
    "set uploads.root (OPS_UPLOADS__ROOT) to the application's uploads directory itself,"
    " e.g. /var/lib/app/uploads"
)


@dataclass(frozen=True)
class RootCheck:
    """The uploads root's identity and the runbook's owner/permissions check."""

    path: Path
    dev: int
    owner: str
    group: str
    mode: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def location_refusal(path: Path, *, home: Path | None, project: Path = PROJECT_DIR) -> str | None:
    """Why ``path`` (absolute, normalised) may not be the uploads root, or None when it may.

    Refused: a system directory or an ancestor of one (``/``, ``/etc``, ``/var``, ``/tmp``...), the
    home directory or an ancestor of it, the project's own directory or an ancestor of it, and anything
    inside a tree of the system itself (/etc, /usr, /boot, /proc...). Other directories below the
    system directories are allowed (/var/lib/app/uploads, /srv/app/uploads).
    """
    for tree in SYSTEM_TREES:
        if path != tree and _inside(path, tree):
            return f"it is inside the system tree {tree}"
    for system in SYSTEM_DIRECTORIES:
        if _inside(system, path):
            return (
                f"it is the system directory {system}"
                if path == system
                else f"it is an ancestor of the system directory {system}"
            )
    if home is not None and _inside(home, path):
        return f"it is the home directory {home} or an ancestor of it"
    if _inside(project, path):
        return f"it is the project's own directory {project} or an ancestor of it"
    return None


def refuse_location(root: Path) -> None:
    """Refuse a root that :func:`location_refusal` names a rule for (plain functions call this too,
    so a caller that skips :func:`check_root` still cannot scan the system).

    Raises:
        UploadsRootRefused: the rule, and how to fix the setting.
    """
    try:
        home: Path | None = Path.home()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry: no home to protect
        home = None
    normal = Path(os.path.abspath(root))
    resolved = Path(os.path.realpath(root))
    homes: list[Path | None] = [None]
    if home is not None:
        homes = [Path(os.path.abspath(home)), Path(os.path.realpath(home))]
    for candidate in dict.fromkeys((normal, resolved)):
        for protected_home in homes:
            reason = location_refusal(candidate, home=protected_home)
            if reason is not None:
                raise UploadsRootRefused(f"uploads root {root} refused: {reason}; {_ROOT_FIX}")


def _storage_refusal(root: Path, uploads: UploadsSettings, storage: StorageSettings | None) -> str | None:
    """Why ``root`` (resolved) overlaps the cleanup's own storage, or None."""
    places: list[tuple[str, Path, str]] = [
        (
            "the quarantine",
            quarantine_directory(uploads, root),
            "set uploads.quarantine_dir (OPS_UPLOADS__QUARANTINE_DIR) to a directory beside the root",
        )
    ]
    if storage is not None:
        parts = urlsplit(storage.url)
        if parts.scheme == "file":
            places.append(
                (
                    "the backup storage",
                    Path(unquote(parts.netloc + parts.path)),
                    "set storage.url (OPS_STORAGE__URL) to a directory outside the uploads root",
                )
            )
    if storage is not None or uploads.plan_dir is not None:
        places.append(
            (
                "the cleanup's plans",
                plan_directory(uploads, storage or StorageSettings()),
                "set uploads.plan_dir (OPS_UPLOADS__PLAN_DIR) to a directory outside the uploads root",
            )
        )
    for what, place, fix in places:
        place = Path(os.path.realpath(place))
        if _inside(place, root) or _inside(root, place):
            return f"it holds {what} {place} (or lies inside it); {fix}"
    return None


def check_root(settings: UploadsSettings, storage: StorageSettings | None = None) -> RootCheck:
    """Refuse a root that could put the system or the cleanup's own data in a plan; then resolve it
    and check its owner and mode against the settings.

    Every rule is checked before anything below the root is read. Refused: a symlink as the root
    (the configured path itself); a system directory or an ancestor of one, the home directory, the
    project's own directory (:func:`location_refusal`); a root that holds (or lies inside) the
    quarantine, the backup storage (``storage``, when given) or the plans; a root whose owner is not
    ``expected_owner`` (name or uid) when that is set. A mode other than ``expected_mode`` is reported
    in ``problems``, not refused.

    Raises:
        UploadsRootRefused: one of the rules above; the message names it and how to fix the setting.
        UploadsRootInvalid: the root does not exist or is not a directory.
    """
    configured = settings.root
    if os.path.islink(configured):
        raise UploadsRootRefused(
            f"uploads root {configured} refused: it is a symlink (to {os.readlink(configured)}), and a"
            f" link can be pointed anywhere; set uploads.root (OPS_UPLOADS__ROOT) to the directory itself"
            " after checking it is the application's uploads directory"
        )
    refuse_location(configured)
    path = Path(os.path.realpath(configured))
    reason = _storage_refusal(path, settings, storage)
    if reason is not None:
        raise UploadsRootRefused(f"uploads root {configured} refused: {reason}")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UploadsRootInvalid(
            f"uploads root {configured} cannot be examined ({exc.strerror}); fix uploads.root"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UploadsRootInvalid(f"uploads root {configured} is not a directory; fix uploads.root")
    owner, group, mode = _user_name(st.st_uid), _group_name(st.st_gid), f"{stat.S_IMODE(st.st_mode):04o}"
    expected = settings.expected_owner
    if expected and expected not in {owner, str(st.st_uid)}:
        raise UploadsRootRefused(
            f"uploads root {path} refused: it is owned by {owner} (uid {st.st_uid}), not by"
            f" uploads.expected_owner {expected}; if it is the application's uploads directory, chown"
            f" {expected} {path}, otherwise {_ROOT_FIX}"
        )
    problems = []
    if settings.expected_mode and int(settings.expected_mode, 8) != stat.S_IMODE(st.st_mode):
        problems.append(
            f"mode {mode}, expected {settings.expected_mode}: chmod {settings.expected_mode} {path}"
        )
    return RootCheck(path=path, dev=st.st_dev, owner=owner, group=group, mode=mode, problems=tuple(problems))
