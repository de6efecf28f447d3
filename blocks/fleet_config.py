"""The fleet config as a Prefect Block, so operators can edit it in the UI."""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field

from fleet.settings import FleetSettings


class FleetConfigBlock(Block):
    """The operator's fleet-wide pins, read at the start of every flow run.

    One rule decides each setting (fleet/config_sources.py): the process environment
    (`FLEET_<NAME>`, e.g. a deployment's job variables) > this block > the store's
    fleet_config (`fleet config`, the dashboard) > the default. An empty field pins
    nothing. A set `max_concurrent` wins over the store's, so `fleet config
    set-max-concurrent` refuses to change it while this block sets it.
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
    cohort_budget_usd: float | None = Field(
        default=None,
        ge=0,
        description="dollars the open cohort may spend before no new apps start (empty = none)",
    )

    def fields(self) -> dict[str, Any]:
        """The settings this block sets (its non-empty fields), for fleet/config_sources.py."""
        return {
            k: v
            for k, v in self.model_dump(include=set(type(self).model_fields)).items()
            if v is not None and k in FleetSettings.model_fields
        }
