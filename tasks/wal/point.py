"""What the flows that restore to a point (restore-to-point, restore-database, recover-data) show and
return: the plan, the result and, for a per-table restore, the side schema with the SQL to use it.
Plain functions, tested without Prefect."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tasks.errors import ParameterError
from tasks.wal.recover import PointPlan, PointRestoreResult


def point_target_given(
    target_time: datetime | None, target_lsn: str | None, target_xid: str | int | None
) -> bool:
    """Whether any point-in-time target was given (the flows then take the point path)."""
    return any(t is not None for t in (target_time, target_lsn, target_xid))


def refuse_backup_and_target(backup_id: str | None, tables: list[str] | None, point: bool) -> None:
    """A logical backup and a point in time are two different sources: exactly one may be named.

    Raises:
        ParameterError: both, or ``tables`` without a target.
    """
    if point and backup_id is not None:
        raise ParameterError(
            f"give either backup_id ({backup_id}) or a point in time (target_time, target_lsn or"
            " target_xid), not both; nothing was touched"
        )
    if tables is not None and not point:
        raise ParameterError(
            "tables needs a point in time (target_time, target_lsn or target_xid): a per-table restore"
            " replays the WAL archive; nothing was touched"
        )


def render_point_plan(plan: PointPlan) -> str:
    """What a restore to a point will do, for the approval form and the dry-run report."""
    what = (
        f"Bring back {', '.join(f'{s}.{t}' for s, t in plan.tables)} of **{plan.database}** as they were"
        f" at {plan.target}, into a side schema."
        if plan.tables
        else f"Restore **{plan.database}** as it was at {plan.target}."
    )
    return "\n".join(
        [
            what,
            "",
            f"- base backup: `{plan.base.id}` (WAL {plan.base.start_lsn} .. {plan.base.stop_lsn})",
            f"- archive check: {plan.check.summary()}",
            *([f"- {plan.window}"] if plan.window else []),
            "",
            "Steps:",
            *[f"{i}. {step}" for i, step in enumerate(plan.steps(), 1)],
        ]
    )


def render_point_done(result: PointRestoreResult) -> list[str]:
    """The result as markdown lines: replay, evidence, what was kept, and the side schema's SQL."""
    lines = [
        f"- replay: {result.reached}",
        f"- evidence: {result.comparison.summary()}",
    ]
    side = result.side
    if side is None:
        lines.append(f"- old database kept as: {result.old_database or '-'}")
    else:
        lines += [
            f"- side schema: `{side.schema}` in {result.target_database}; every other table keeps"
            " today's data",
            *[
                f"- `{side.schema}.{t.table}`: {t.rows} rows, as `{t.name}` was at the target"
                + ("" if t.live_exists else f" (`{t.name}` does not exist now)")
                for t in side.tables
            ],
            *([f"- dropped on the side copies: {', '.join(side.dropped)}"] if side.dropped else []),
            "",
            "Compare and copy back (review first; each statement stands alone):",
            "",
            "```sql",
            "\n\n".join(side.operator_sql()),
            "```",
        ]
    lines += [
        f"- took {result.duration_seconds:.1f} s ({result.phases.describe()})",
        "",
        "Commands:",
        *[f"- `{c}`" for c in result.commands],
    ]
    return lines


def point_result(result: PointRestoreResult) -> dict[str, Any]:
    """The result as a flow returns it."""
    side = result.side
    return {
        "target": result.plan.target,
        "base_backup": result.plan.base.id,
        "reached": result.reached,
        "target_database": result.target_database,
        "old_database": result.old_database,
        "matches": result.comparison.matches,
        "tables": result.comparison.tables_compared,
        "rows": result.comparison.rows_compared,
        "side_schema": side.schema if side else None,
        "restored_tables": {t.name: t.rows for t in side.tables} if side else {},
        "sql": side.operator_sql() if side else [],
    }
