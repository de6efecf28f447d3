"""Store outages pause the work instead of crashing it: retry with backoff up to a budget.

`outage_tolerant(call, budget=…, clock=…, log_key=…)` (async) and `outage_tolerant_sync`
repeat a store call that raised StoreUnreachable — the StoreUnavailable that the PostgreSQL
connector and the REST store raise when the store cannot be reached (refused, dropped,
shutting down, out of connections) — with capped exponential backoff, for up to `budget` seconds
(`store_outage_budget_seconds`, 5 min by default). They log ONE warning line per `log_key`
per outage, however many calls and tries wait on it, and one "store back after N s" line
when it answers again; past the budget they raise StoreOutage, a one-line, resumable
failure. The budget counts from the start of the outage, not of each call: a call that begins
waiting late in an outage (the cohort reading the stage of an app that just gave up) gives up
with the others, so a whole run never waits more than one budget for one outage. Any other
error passes through at once: StaleLease, InvalidTransition, and a StoreUnavailable for a
query the store refused (a missing migration, a bad key), which waiting would not cure.

Wrap only calls that are safe to repeat: reads, fenced stage writes, `renew_claim`,
`record_effect`, lease acquisition — every Store write is idempotent by design, except a
claim whose connection dropped mid-call (the caller re-reads the state before claiming).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import tenacity

from fleet.clock import Clock
from fleet.errors import FleetError
from fleet.store.refusals import StoreUnreachable

T = TypeVar("T")

log = logging.getLogger("fleet.store.outage")

BACKOFF_INITIAL_SECONDS = 0.5
# The cap bounds how late a call notices the store is back (at most one cap after it).
BACKOFF_CAP_SECONDS = 10.0


class StoreOutage(FleetError):
    """The store stayed unreachable past the outage budget; the app's work is resumable."""


__all__ = [
    "OUTAGES",
    "OutageLog",
    "StoreOutage",
    "StoreUnreachable",
    "outage_tolerant",
    "outage_tolerant_sync",
]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OutageLog:
    """Which log keys are waiting on an outage now, so each logs one line per outage; and
    since when this process has seen the store unreachable (the outage's start)."""

    def __init__(self, logger: logging.Logger = log):
        self._logger = logger
        self._since: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self._outage_since: datetime | None = None
        self._last_failure: datetime | None = None

    def failed(self, now: datetime, quiet: float) -> datetime:
        """A try failed at `now`; returns when this outage began. Failures more than `quiet`
        seconds apart (nobody was waiting: the store may have been back) start a new one."""
        with self._lock:
            last = self._last_failure
            if self._outage_since is None or last is None or (now - last).total_seconds() > quiet:
                self._outage_since = now
            self._last_failure = now
            return self._outage_since

    def answered(self) -> None:
        with self._lock:
            self._outage_since = self._last_failure = None

    def down(self, key: str, now: datetime, exc: BaseException, budget: float) -> None:
        with self._lock:
            if key in self._since:
                return
            self._since[key] = now
        self._logger.warning(
            "store unreachable (%s), waiting up to %.0f s for it: %s",
            key,
            budget,
            _first_line(exc),
        )

    def up(self, key: str, now: datetime) -> None:
        with self._lock:
            since = self._since.pop(key, None)
        if since is not None:
            self._logger.warning("store back (%s) after %.1f s", key, (now - since).total_seconds())

    def gave_up(self, key: str) -> None:
        with self._lock:
            self._since.pop(key, None)


OUTAGES = OutageLog()
_UNREACHABLE = tenacity.retry_if_exception_type(StoreUnreachable)


class _Budget:
    """Tenacity's stop, wait and before_sleep for one call, measured on the injected clock."""

    def __init__(
        self,
        budget: float,
        clock: Clock,
        log_key: str,
        outages: OutageLog,
        initial: float,
        cap: float,
    ):
        self.budget, self.clock, self.log_key, self.outages = budget, clock, log_key, outages
        self.started = clock.now()
        self.deadline = self.started + timedelta(seconds=budget)
        self._backoff = tenacity.wait_exponential(multiplier=initial, max=cap)
        self._quiet = 2 * cap + 1  # waiters try at least every `cap`: a longer gap is a new outage

    def stop(self, state: tenacity.RetryCallState) -> bool:
        # The outage's budget, shared by every call waiting on it: one that joined late
        # gives up when the first waiter does, not a whole budget later.
        began = self.outages.failed(self.clock.now(), self._quiet)
        self.deadline = min(self.deadline, began + timedelta(seconds=self.budget))
        return self.clock.now() >= self.deadline

    def wait(self, state: tenacity.RetryCallState) -> float:
        # Never sleep past the deadline: the last try happens at it, then the call gives up.
        left = (self.deadline - self.clock.now()).total_seconds()
        return max(0.0, min(self._backoff(state), left))

    def before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.outages.down(self.log_key, self.clock.now(), exc or StoreUnreachable(), self.budget)

    def retrying(self, sleep: Callable[[float], Any]) -> dict[str, Any]:
        """Tenacity's arguments for this call (Retrying or AsyncRetrying, by `sleep`)."""
        return dict(
            sleep=sleep,
            retry=_UNREACHABLE,
            stop=self.stop,
            wait=self.wait,
            before_sleep=self.before_sleep,
            reraise=True,
        )

    def succeeded(self) -> None:
        self.outages.answered()
        self.outages.up(self.log_key, self.clock.now())

    def outage(self, exc: StoreUnreachable) -> StoreOutage:
        self.outages.gave_up(self.log_key)
        waited = (self.clock.now() - self.started).total_seconds()
        return StoreOutage(
            f"store unreachable for {waited:.0f} s, past the outage budget of "
            f"{self.budget:.0f} s ({self.log_key}): {_first_line(exc)} — nothing was lost; "
            "the app resumes on the next run once the store is back"
        )


async def outage_tolerant(
    call: Callable[[], T] | Callable[[], Awaitable[T]],
    *,
    budget: float,
    clock: Clock,
    log_key: str,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    outages: OutageLog = OUTAGES,
    initial: float = BACKOFF_INITIAL_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
) -> T:
    """`await call()` (a coroutine function) or `call()` in a worker thread (a blocking store
    call must not stall the event loop), waiting out a store outage of up to `budget` s."""
    policy = _Budget(budget, clock, log_key, outages, initial, cap)

    async def once() -> T:
        if inspect.iscoroutinefunction(call):
            return await cast(Callable[[], Awaitable[T]], call)()
        return await asyncio.to_thread(cast(Callable[[], T], call))

    try:
        result: T = await once()  # the usual case: no retry machinery at all
    except StoreUnreachable as first:
        failed = [first]

        async def again() -> T:  # the first failure replayed as the policy's attempt 1
            if failed:
                raise failed.pop()
            return await once()

        try:
            result = await tenacity.AsyncRetrying(**policy.retrying(sleep or asyncio.sleep))(again)
        except StoreUnreachable as exc:
            raise policy.outage(exc) from None
    policy.succeeded()
    return result


async def through_outages(
    settings: Any, clock: Clock, key: str, fn: Callable[..., Any], *args: Any
) -> Any:
    """`fn(*args)` (a store call, or a coroutine function) waiting out a store outage of up to
    `settings.store_outage_budget_seconds` on `clock`, logged once per outage under `key` —
    the one way an app run, its claim and the cohort flow reach the store."""
    return await outage_tolerant(
        functools.partial(fn, *args),
        budget=settings.store_outage_budget_seconds,
        clock=clock,
        log_key=key,
        sleep=clock.asleep,
    )


def outage_tolerant_sync(
    call: Callable[[], T],
    *,
    budget: float,
    clock: Clock,
    log_key: str,
    outages: OutageLog = OUTAGES,
    initial: float = BACKOFF_INITIAL_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
) -> T:
    """The blocking twin of `outage_tolerant` (threads, the live table); sleeps on `clock`."""
    policy = _Budget(budget, clock, log_key, outages, initial, cap)
    try:
        result = tenacity.Retrying(**policy.retrying(clock.sleep))(call)
    except StoreUnreachable as exc:
        raise policy.outage(exc) from None
    policy.succeeded()
    return result
