"""The orchestrator's stage metrics reach a Prometheus Pushgateway at the end of a cohort run
(a local HTTP server speaking the Pushgateway's PUT /metrics/job/<job>), and a gateway that is
away costs one warning, never the run."""

from __future__ import annotations

import logging

from fleet import metrics
from fleet.metrics import samples


def test_the_stage_metrics_are_pushed_to_the_configured_gateway(pushgateway):
    address, pushed = pushgateway
    metrics.stage_finished("review", 12.0)
    metrics.stage_retried("review")
    assert metrics.push_pipeline(address, job="fleet-cohort") is True
    [(method, path, body)] = pushed
    assert (method, path) == ("PUT", "/metrics/job/fleet-cohort")
    names = {name for name, labels, _ in samples(body.decode()) if labels.get("stage") == "review"}
    assert {"fleet_stage_duration_seconds_count", "fleet_stage_retries_total"} <= names


def test_no_gateway_configured_pushes_nothing(pushgateway):
    _, pushed = pushgateway
    assert metrics.push_pipeline("", job="fleet-cohort") is False
    assert pushed == []


def test_a_gateway_that_is_away_costs_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fleet.metrics"):
        assert metrics.push_pipeline("127.0.0.1:9", job="fleet-cohort") is False
    [record] = [r for r in caplog.records if r.name == "fleet.metrics"]
    assert "not pushed" in record.getMessage() and record.exc_info is None
