"""CircuitBreaker: consecutive failures open it, one half-open probe after the reset decides."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import pytest

from fleet.clients.breaker import CircuitBreaker, breaker_for, breaker_states
from fleet.clock import ManualClock
from fleet.errors import CircuitOpen


def _breaker(clock: ManualClock, threshold: int = 3, reset: float = 60) -> CircuitBreaker:
    return CircuitBreaker(f"test-{uuid.uuid4().hex[:8]}", threshold, reset, clock)


def test_opens_after_consecutive_failures_only():
    clock = ManualClock()
    b = _breaker(clock)
    b.record_failure("boom")
    b.record_failure("boom")
    b.record_success()  # a success in between resets the count
    b.record_failure("boom")
    b.record_failure("boom")
    assert b.state == "closed"
    b.record_failure("boom")
    assert b.state == "open"


def test_open_refuses_calls_and_says_when_it_retries():
    clock = ManualClock()
    b = _breaker(clock, threshold=1, reset=60)
    b.record_failure("HTTP 503")
    clock.advance(20)
    with pytest.raises(CircuitOpen) as err:
        b.call(lambda: "never runs")
    assert "HTTP 503" in str(err.value)
    assert "40 s" in str(err.value)


def test_half_open_lets_one_probe_and_success_closes():
    clock = ManualClock()
    b = _breaker(clock, threshold=2, reset=60)
    b.record_failure("x")
    b.record_failure("x")
    clock.advance(59)
    assert b.state == "open"
    clock.advance(1)
    assert b.state == "half_open"
    b.before_call()  # the one probe
    with pytest.raises(CircuitOpen, match="probe"):
        b.before_call()  # a second caller while the probe is in flight
    b.record_success()
    assert b.state == "closed"
    assert b.call(lambda: 42) == 42


def test_failed_probe_reopens_for_a_full_reset_period():
    clock = ManualClock()
    b = _breaker(clock, threshold=1, reset=30)
    b.record_failure("x")
    clock.advance(30)
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)
    assert b.state == "open"
    clock.advance(29)
    assert b.state == "open"
    clock.advance(1)
    assert b.state == "half_open"


def test_call_counts_exceptions_and_reraises_them():
    clock = ManualClock()
    b = _breaker(clock, threshold=2)
    for _ in range(2):
        with pytest.raises(KeyError):
            b.call(lambda: {}["missing"])
    assert b.state == "open"
    assert "KeyError" in b.snapshot()["last_error"]


def test_state_changes_are_logged_and_queryable(caplog):
    clock = ManualClock()
    b = _breaker(clock, threshold=1, reset=10)
    with caplog.at_level(logging.INFO, logger="fleet.breaker"):
        b.record_failure("connect refused")
        clock.advance(10)
        assert b.state == "half_open"
        b.record_success()
    messages = [r.getMessage() for r in caplog.records if r.name == "fleet.breaker"]
    assert any("-> open" in m and "connect refused" in m for m in messages)
    assert any("open -> half_open" in m for m in messages)
    assert any("half_open -> closed" in m for m in messages)
    state = breaker_states()[b.name]
    assert state["state"] == "closed" and state["failures"] == 0


def test_states_registry_reports_open_with_retry_time():
    clock = ManualClock()
    b = _breaker(clock, threshold=1, reset=60)
    b.record_failure("x")
    state = breaker_states()[b.name]
    assert state["state"] == "open"
    assert state["retry_at"] == (clock.now() + timedelta(seconds=60)).isoformat()


def test_breaker_for_shares_one_breaker_per_name():
    name = f"endpoint-{uuid.uuid4().hex[:8]}"
    first = breaker_for(name, failure_threshold=2, clock=ManualClock())
    assert breaker_for(name) is first
    assert first.failure_threshold == 2


def test_rejects_nonsense_thresholds():
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("bad", failure_threshold=0)
