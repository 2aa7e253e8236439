"""The database check of the uploads cleanup against a real PostgreSQL: files the application still
references are kept, at plan time and again right before acting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
import pytest

from tasks import uploads
from tasks.settings import PostgresSettings, UploadsSettings

pytestmark = pytest.mark.integration

DAY = 86400


def put(path: Path, age_days: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"upload")
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))


@pytest.fixture
def app_db(pg_database: tuple[str, str]) -> str:
    """The application's table of uploads, as Swagger2MCP keeps it (a path per uploaded spec)."""
    _, dsn = pg_database
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE uploads (id serial PRIMARY KEY, path text NOT NULL UNIQUE, created_at timestamptz)"
        )
        conn.execute("CREATE TABLE specs (id serial PRIMARY KEY, file text)")
    return dsn


def insert(dsn: str, table: str, column: str, *values: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {table} ({column}) VALUES (%s)", [(v,) for v in values])


def clean(
    settings: UploadsSettings,
    dsn: str,
    plans: Path,
    *,
    confirm: bool,
    from_plan: Path | None = None,
) -> uploads.CleanupOutcome:
    check = uploads.check_root(settings)
    run_id = uploads.new_run_id()
    return uploads.clean_uploads(
        settings,
        PostgresSettings(dsn=dsn),
        root=check.path,
        cutoff=time.time() - 30 * DAY,
        run_id=run_id,
        plan_path=plans / f"uploads-plan-{run_id}.jsonl",
        mode="delete",
        confirm=confirm,
        from_plan=from_plan,
    )


def test_referenced_files_are_kept(app_db: str, tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    for rel in ("specs/a.json", "specs/b.json", "specs/c.json", "odd name.yaml", "x/100%.json"):
        put(root / rel, 60)
    put(root / os.fsdecode(b"not-utf8-\xff.json"), 60)
    insert(app_db, "uploads", "path", "specs/a.json", "odd name.yaml", "x/100%.json", "specs/missing.json")
    settings = UploadsSettings(
        root=root,
        reference_query="SELECT path FROM uploads WHERE path NOT LIKE 'tmp/%';",
    )

    dry = clean(settings, app_db, tmp_path / "plans", confirm=False)
    assert dry.plan.stats.referenced == 3
    assert {e.rel for e in uploads.read_jsonl(Path(dry.plan.plan_path))} == {
        "specs/b.json",
        "specs/c.json",
        os.fsdecode(b"not-utf8-\xff.json"),
    }

    done = clean(settings, app_db, tmp_path / "plans", confirm=True)
    assert done.removal.acted == 3
    assert sorted(os.listdir(root / "specs")) == ["a.json"]
    assert (root / "odd name.yaml").exists()
    assert (root / "x" / "100%.json").exists()
    with psycopg.connect(app_db) as conn:
        assert conn.execute("SELECT count(*) FROM uploads").fetchone() == (4,)


def test_prefixed_paths_match(app_db: str, tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    put(root / "a.json", 60)
    put(root / "b.json", 60)
    insert(app_db, "specs", "file", "/app/backend/uploads/a.json")
    settings = UploadsSettings(
        root=root, reference_query="SELECT file FROM specs", reference_prefix="/app/backend/uploads"
    )
    done = clean(settings, app_db, tmp_path / "plans", confirm=True)
    assert (done.plan.stats.referenced, done.removal.acted) == (1, 1)
    assert (root / "a.json").exists()
    assert not (root / "b.json").exists()


def test_file_referenced_between_plan_and_apply_is_kept(app_db: str, tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    put(root / "a.json", 60)
    put(root / "b.json", 60)
    settings = UploadsSettings(root=root, reference_query="SELECT path FROM uploads")
    dry = clean(settings, app_db, tmp_path / "plans", confirm=False)
    assert dry.plan.stats.planned == 2

    insert(app_db, "uploads", "path", "b.json")  # the application starts using b.json again
    done = clean(settings, app_db, tmp_path / "plans", confirm=True, from_plan=Path(dry.plan.plan_path))

    assert (done.removal.acted, done.removal.kept_referenced) == (1, 1)
    assert not (root / "a.json").exists()
    assert (root / "b.json").exists()


def test_failing_query_removes_nothing(app_db: str, tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    put(root / "a.json", 60)
    settings = UploadsSettings(root=root, reference_query="SELECT path FROM no_such_table")
    with pytest.raises(uploads.ReferenceCheckFailed, match="no_such_table"):
        clean(settings, app_db, tmp_path / "plans", confirm=True)
    assert (root / "a.json").exists()


def test_unreachable_database_removes_nothing_and_hides_the_password(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    put(root / "a.json", 60)
    settings = UploadsSettings(root=root, reference_query="SELECT path FROM uploads")
    dsn = "postgresql://postgres:s3cret-pw@127.0.0.1:9/none"
    with pytest.raises(uploads.ReferenceCheckFailed) as caught:
        clean(settings, dsn, tmp_path / "plans", confirm=True)
    assert "s3cret-pw" not in str(caught.value)
    assert (root / "a.json").exists()


def test_reference_query_cannot_write(app_db: str, tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    put(root / "a.json", 60)
    insert(app_db, "uploads", "path", "a.json")
    settings = UploadsSettings(
        root=root, reference_query="SELECT path FROM uploads WHERE nextval('uploads_id_seq') > 0"
    )
    with pytest.raises(uploads.ReferenceCheckFailed, match="read-only"):
        clean(settings, app_db, tmp_path / "plans", confirm=True)
    with psycopg.connect(app_db) as conn:
        # The sequence did not move: the query ran read-only.
        assert conn.execute("SELECT last_value, is_called FROM uploads_id_seq").fetchone() == (1, True)
    assert (root / "a.json").exists()


def test_reference_check_is_batched_and_uses_the_index(app_db: str, tmp_path: Path) -> None:
    with psycopg.connect(app_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO uploads (path) SELECT 'f/' || i || '.json' FROM generate_series(1, 20000) i"
        )
        conn.execute("ANALYZE uploads")
    with psycopg.connect(app_db, autocommit=True) as conn:
        checker = uploads.ReferenceChecker(
            conn, "SELECT path FROM uploads", None, PostgresSettings(dsn=app_db)
        )
        wanted = [f"f/{i}.json" for i in range(19990, 20010)]
        assert checker.referenced(wanted) == {f"f/{i}.json" for i in range(19990, 20001)}
        plan = conn.execute(
            "EXPLAIN SELECT refs.path FROM (SELECT path FROM uploads) AS refs(path)"
            " WHERE refs.path = ANY(%s)",
            [wanted],
        ).fetchall()
    assert "uploads_path_key" in " ".join(row[0] for row in plan)
