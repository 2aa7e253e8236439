"""Restoring backups: the pipeline into an empty database, the preflight, the swap by rename, the
kept database and the swap back."""
