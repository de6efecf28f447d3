"""The fleet config as a Prefect Block, so operators can edit it in the UI."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field

from fleet.settings import FleetSettings


class FleetConfigBlock(Block):
    """Overrides of the engine's settings, applied at the start of every flow run.

    Empty fields leave the settings (env vars / defaults) as they are. `max_concurrent`,
    when set, is written to the store's fleet_config, which stays the source of truth
    that other tools (the Swift dashboard) read and may edit too.
    """

    _block_type_name: ClassVar[str] = "Fleet Config"
    _block_type_slug: ClassVar[str] = "fleet-config"
    _description: ClassVar[str] = (
        "Fleet Evolution Engine: fleet file, cohort sizes, targets, concurrency."
    )

    fleet_file: str | None = Field(default=None, description="path of the fleet file on the worker")
    max_concurrent: int | None = Field(
        default=None, ge=1, le=1000, description="apps a cohort run may start at once"
    )
    cohort_sizes: list[int] | None = Field(
        default=None, description="progressive cohort sizes, e.g. [10, 20, 40]"
    )
    review_target: str | None = Field(
        default=None, description="machine for the adversarial review (mac4)"
    )
    review_model: str | None = Field(default=None, description="agent for the review (codex)")
    ship_target: str | None = Field(default=None, description="machine with Xcode for SHIP (mac1)")
    hydra_poll_seconds: float | None = Field(
        default=None, gt=0, description="quality-gate poll interval"
    )

    def apply(self, settings: FleetSettings) -> FleetSettings:
        update = {
            k: v
            for k, v in self.model_dump(include=set(type(self).model_fields)).items()
            if v is not None and k in FleetSettings.model_fields and k != "max_concurrent"
        }
        return settings.model_copy(update=update)
