"""The heartbeat that keeps a run's short claim on an app alive while the run lives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from fleet.clock import Clock
from fleet.store.base import Store
from fleet.store.outage import StoreOutage, outage_tolerant

log = logging.getLogger("fleet.store.heartbeat")


class ClaimHeartbeat:
    """`async with ClaimHeartbeat(...) as beat:` renews the claim (`Store.renew_claim`) every
    `every_seconds` while the block runs; a dead run stops renewing, so its app is free
    again within one `lease_seconds`.

    `lost` is set when the claim can no longer be renewed — a newer epoch holds the app,
    the claim was released, or the store stayed away past `outage_budget` — and the run
    must then stop working on the app (its fenced writes would be refused anyway).
    """

    def __init__(
        self,
        store: Store,
        app_id: str,
        epoch: int,
        *,
        clock: Clock,
        lease_seconds: float,
        every_seconds: float,
        outage_budget: float,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ):
        if not 0 < every_seconds < lease_seconds:
            raise ValueError(
                f"the heartbeat runs every {every_seconds} s but the lease lasts "
                f"{lease_seconds} s — app_heartbeat_seconds must be below app_lease_seconds"
            )
        self.store, self.app_id, self.epoch, self.clock = store, app_id, epoch, clock
        self.lease_seconds, self.every_seconds = lease_seconds, every_seconds
        self.outage_budget = outage_budget
        self._sleep = sleep or asyncio.sleep
        self.lost = asyncio.Event()
        self.beats = 0
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> bool:
        """One renewal (waiting out a store outage); False once the claim is lost."""
        try:
            renewed = await outage_tolerant(
                lambda: self.store.renew_claim(
                    self.app_id, self.epoch, self.clock.now(), self.lease_seconds
                ),
                budget=self.outage_budget,
                clock=self.clock,
                log_key=self.app_id,
                sleep=self._sleep,
            )
        except StoreOutage as exc:
            log.warning("%s: claim not renewed, giving the app up: %s", self.app_id, exc)
            renewed = False
        if renewed:
            self.beats += 1
        else:
            self.lost.set()
        return renewed

    async def run(self) -> None:
        """Beat every `every_seconds` until the claim is lost (or the task is cancelled)."""
        while True:
            await self._sleep(self.every_seconds)
            if not await self.beat():
                return

    async def __aenter__(self) -> ClaimHeartbeat:
        self._task = asyncio.create_task(self.run(), name=f"heartbeat-{self.app_id}")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
