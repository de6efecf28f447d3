"""The deployment form explains and bounds every parameter (the schema Prefect 3.9 builds
from the flows' signatures and docstrings; no server needed)."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema

from flows.app_evolution import evolve_app
from flows.cohort import fleet_cohort


@pytest.mark.parametrize("flow", [fleet_cohort, evolve_app], ids=lambda f: f.name)
def test_every_parameter_has_a_description(flow):
    properties = parameter_schema(flow.fn).model_dump()["properties"]
    assert properties and all(p.get("description") for p in properties.values()), properties


def test_size_is_at_least_one_or_empty():
    size = parameter_schema(fleet_cohort.fn).model_dump()["properties"]["size"]
    assert {"type": "integer", "minimum": 1} in size["anyOf"]
    assert {"type": "null"} in size["anyOf"]
