"""Circuit breaker per endpoint: consecutive failures open it, one half-open probe closes it."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from fleet.clock import Clock, SystemClock
from fleet.errors import CircuitOpen
from fleet.settings import get_settings

log = logging.getLogger("fleet.breaker")

T = TypeVar("T")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# Every breaker by name, so the CLI and the metrics can show the state of each endpoint.
_REGISTRY: dict[str, CircuitBreaker] = {}
_REGISTRY_LOCK = threading.RLock()
# Where state changes go besides the log (share_states): (name, snapshot, at) → None.
StateSink = Callable[[str, dict, datetime], None]
_SINK: StateSink | None = None


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failed calls; after `reset_seconds` it lets
    exactly one probe through (half-open): success closes it, failure opens it again.

    Use `call(fn)`, or `before_call()` then `record_success()` / `record_failure()` when the
    outcome is decided outside one function (e.g. a 4xx answer counts as the endpoint alive).
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_seconds: float = 60,
        clock: Clock | None = None,
    ):
        if failure_threshold < 1:
            raise ValueError(
                f"breaker {name!r}: failure_threshold must be >= 1, got {failure_threshold}"
            )
        if reset_seconds < 0:
            raise ValueError(f"breaker {name!r}: reset_seconds must be >= 0, got {reset_seconds}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self.clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at: datetime | None = None
        self._probe_in_flight = False
        self._last_error: str | None = None
        with _REGISTRY_LOCK:
            _REGISTRY[name] = self

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state!r}, failures={self._failures})"

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        with self._lock:
            return self._current_state()

    def _current_state(self) -> str:
        # Open turns half-open by itself once the reset time has passed (read lazily).
        if (
            self._state == OPEN
            and self._opened_at is not None
            and self.clock.now() >= self._opened_at + timedelta(seconds=self.reset_seconds)
        ):
            self._transition(HALF_OPEN)
        return self._state

    def _transition(self, new: str) -> None:
        old, self._state = self._state, new
        if old == new:
            return
        self._publish()
        if new == OPEN:
            log.warning(
                "circuit breaker %s: %s -> open after %d consecutive failure(s) (last: %s); "
                "next probe in %g s",
                self.name,
                old,
                self._failures,
                self._last_error,
                self.reset_seconds,
            )
        else:
            log.info("circuit breaker %s: %s -> %s", self.name, old, new)

    def retry_at(self) -> datetime | None:
        with self._lock:
            if self._state == OPEN and self._opened_at is not None:
                return self._opened_at + timedelta(seconds=self.reset_seconds)
            return None

    def _publish(self) -> None:
        """Hand the state to the sink (the mesh store); a failing sink never fails a call."""
        sink = _SINK
        if sink is None:
            return
        try:
            sink(self.name, self._snapshot_unlocked(self._state), self.clock.now())
        except Exception as exc:
            log.warning("circuit breaker %s: could not share its state (%s)", self.name, exc)

    def snapshot(self) -> dict:
        with self._lock:
            return self._snapshot_unlocked(self._current_state())

    def _snapshot_unlocked(self, state: str) -> dict:
        retry_at = (
            self._opened_at + timedelta(seconds=self.reset_seconds)
            if state == OPEN and self._opened_at is not None
            else None
        )
        return {
            "state": state,
            "failures": self._failures,
            "failure_threshold": self.failure_threshold,
            "reset_seconds": self.reset_seconds,
            "opened_at": self._opened_at.isoformat() if self._opened_at else None,
            "retry_at": retry_at.isoformat() if retry_at else None,
            "last_error": self._last_error,
        }

    # -- hooks -----------------------------------------------------------------------------

    def before_call(self) -> None:
        """Raise CircuitOpen unless a call may go now (closed, or the one half-open probe)."""
        with self._lock:
            state = self._current_state()
            if state == CLOSED:
                return
            if state == HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return
            if state == HALF_OPEN:
                raise CircuitOpen(
                    f"circuit breaker {self.name} is half-open and its one probe call is in "
                    "flight; try again when it has answered"
                )
            assert self._opened_at is not None
            wait = (
                self._opened_at + timedelta(seconds=self.reset_seconds) - self.clock.now()
            ).total_seconds()
            raise CircuitOpen(
                f"circuit breaker {self.name} is open after {self._failures} consecutive "
                f"failure(s) (last: {self._last_error}); calls resume with one probe in "
                f"{max(wait, 0):.0f} s"
            )

    def record_success(self) -> None:
        with self._lock:
            self._probe_in_flight = False
            self._failures = 0
            self._opened_at = None
            self._transition(CLOSED)

    def record_failure(self, reason: str = "") -> None:
        with self._lock:
            state = self._current_state()
            self._probe_in_flight = False
            self._failures += 1
            self._last_error = (reason or "failure")[:200]
            if state == OPEN:
                return  # a call admitted before the breaker opened: keep the opening time
            if state == HALF_OPEN or self._failures >= self.failure_threshold:
                self._opened_at = self.clock.now()
                self._transition(OPEN)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` under the breaker: any exception counts as a failure and is re-raised."""
        self.before_call()
        try:
            result = fn()
        except BaseException as exc:
            self.record_failure(f"{type(exc).__name__}: {exc}")
            raise
        self.record_success()
        return result


def breaker_for(
    name: str,
    *,
    failure_threshold: int | None = None,
    reset_seconds: float | None = None,
    clock: Clock | None = None,
) -> CircuitBreaker:
    """The breaker registered under `name`, created on first use, so every client of one
    endpoint shares one breaker. Thresholds default to the settings."""
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(name)
        if existing is not None:
            return existing
        settings = get_settings()
        return CircuitBreaker(
            name,
            settings.breaker_failure_threshold if failure_threshold is None else failure_threshold,
            settings.breaker_reset_seconds if reset_seconds is None else reset_seconds,
            clock,
        )


def breaker_states() -> dict[str, dict]:
    """State of every breaker by name: state, failures, opened_at, retry_at, last_error."""
    with _REGISTRY_LOCK:
        breakers = list(_REGISTRY.values())
    return {b.name: b.snapshot() for b in breakers}


def share_states(store: Any, holder: str | None = None) -> None:
    """Write every breaker's state changes, from now on and as they are now, to the mesh store
    (`record_breaker`), so the watchdog sees the breakers of every process, not its own."""
    global _SINK
    holder = holder or f"{socket.gethostname()}:{os.getpid()}"

    def sink(name: str, snapshot: dict, at: datetime) -> None:
        store.record_breaker(name, holder, snapshot, at)

    _SINK = sink
    with _REGISTRY_LOCK:
        breakers = list(_REGISTRY.values())
    for b in breakers:
        with b._lock:
            b._publish()


def stop_sharing_states() -> None:
    global _SINK
    _SINK = None
