"""The approvals section."""

from __future__ import annotations

from pydantic import Field

from tasks.settings.base import _Section


class ApprovalSettings(_Section):
    """Who may skip the approval form of destructive flows."""

    allow_preapproved: bool | None = Field(
        default=None,
        description=(
            "whether approved=true may replace the approval form; unset: allowed unless"
            " runtime.environment is `production`"
        ),
    )
