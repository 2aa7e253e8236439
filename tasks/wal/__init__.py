"""Point-in-time recovery: the WAL archive, base backups and restores to a moment.

Modules: ``names`` (WAL names and LSNs, pure), ``archive`` (the archive in the storage backend),
``archiver`` (the long-running service, ``python -m tasks.wal.archiver``), ``fetch`` (the
``restore_command``), ``base`` (base backups and retention), ``status`` (RPO, slot lag, window),
``recover`` (replay into a scratch instance, copy, compare, swap; ``scratch`` is that instance and
``copy`` the sectioned copy onto the app's server), ``timelines`` (history files and
which timeline a replay reads each segment from), ``targets`` (the restorable window
and the checks of a time, LSN or transaction id), ``tables`` (per-table restores into a side schema),
``point`` (the plan and result as the flows show them), ``drill`` (recover to a logical backup's
snapshot and compare with its manifest), ``steps`` (the Prefect tasks).

This package imports no Prefect at import time: ``fetch`` runs once per segment during a recovery.
"""
