"""The scaling section: the replica counts scale-services may set without a person's approval."""

from __future__ import annotations

from pydantic import Field, model_validator

from tasks.settings.base import _Section


class ReplicaBounds(_Section):
    """The replica counts one service may run at without approval, both ends included."""

    min: int = Field(ge=1, description="fewest replicas without approval (0 always needs approval)")
    max: int = Field(ge=1, description="most replicas without approval")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaBounds:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must not be below min ({self.min})")
        return self


class ScalingSettings(_Section):
    """Runbook "High CPU Usage: scale if the load is legitimate": bounds per service and sizing."""

    bounds: dict[str, ReplicaBounds] = Field(
        default_factory=dict,
        description=(
            "replica bounds per service (JSON map service -> {min, max}); scale-services applies a count"
            " within them without approval; a count outside them, 0, or a service without bounds needs"
            " approval"
        ),
        examples=[{"backend": {"min": 2, "max": 6}, "worker": {"min": 1, "max": 4}}],
    )
    cpu_target_percent: float = Field(
        default=70.0,
        gt=0,
        description=(
            "CPU per replica diagnose sizes its suggested scale-out for, percent of one core (the"
            " suggestion is capped by the service's max bound)"
        ),
    )
    approval_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="how long scale-services waits for approval, seconds"
    )
