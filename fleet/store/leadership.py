"""The planner lease: one cohort run at a time plans, a standby takes over within one lease."""

from __future__ import annotations

from datetime import datetime, timedelta

from fleet.clock import Clock
from fleet.store.base import Lease, Store

PLANNER = "planner"


class PlannerLease:
    """Leadership of the lease `name` for `holder`, over `Store.acquire_lease`.

    A loop calls `tick()` every `wake_in()` seconds: a follower tries to lead (every
    `retry_seconds`), the leader renews (every `renew_seconds`, well inside the lease).
    The leader may plan only while `holds()`: until its own last renewal plus the lease, by
    its own clock — after that a standby may already have taken over. `epoch` is the fencing
    token of the current leadership (it grows whenever the holder changes).
    """

    def __init__(
        self,
        store: Store,
        holder: str,
        clock: Clock,
        *,
        name: str = PLANNER,
        lease_seconds: float = 15,
        renew_seconds: float = 10,
        retry_seconds: float = 2,
    ):
        if not 0 < renew_seconds < lease_seconds:
            raise ValueError(
                f"the planner renews every {renew_seconds} s but its lease lasts "
                f"{lease_seconds} s — renew_seconds must be below lease_seconds"
            )
        self.store, self.holder, self.clock, self.name = store, holder, clock, name
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.retry_seconds = retry_seconds
        self.epoch: int | None = None
        self._valid_until: datetime | None = None

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    def holds(self, now: datetime | None = None) -> bool:
        """Leading, and the lease this holder last wrote has not run out yet."""
        now = now or self.clock.now()
        return self._valid_until is not None and now < self._valid_until

    def try_lead(self, now: datetime | None = None) -> bool:
        """Take the lease if it is free or expired (or renew it if already ours)."""
        now = now or self.clock.now()
        epoch = self.store.acquire_lease(self.name, self.holder, now, self.lease_seconds)
        if epoch is None:
            self._lose()
            return False
        self.epoch, self._valid_until = epoch, now + timedelta(seconds=self.lease_seconds)
        return True

    def renew(self, now: datetime | None = None) -> bool:
        """Extend the leadership; False (and no longer leading) if it was lost meanwhile."""
        if self.epoch is None:
            return False
        now = now or self.clock.now()
        epoch = self.store.acquire_lease(self.name, self.holder, now, self.lease_seconds)
        if epoch != self.epoch:
            # Another holder took it after our lease ran out (even if we got it back since,
            # the epoch moved: our earlier plans are fenced off).
            self._lose()
            return False
        self._valid_until = now + timedelta(seconds=self.lease_seconds)
        return True

    def tick(self, now: datetime | None = None) -> bool:
        """One wake of the loop: renew when leading, else try to lead; whether we lead."""
        return self.renew(now) if self.leading else self.try_lead(now)

    def wake_in(self) -> float:
        """Seconds until the next `tick()`."""
        return self.renew_seconds if self.leading else self.retry_seconds

    def release(self, now: datetime | None = None) -> None:
        """Give the lease up (clean shutdown): a standby takes over at its next retry."""
        if self.epoch is not None:
            self.store.release_lease(self.name, self.holder, self.epoch, now or self.clock.now())
        self._lose()

    def _lose(self) -> None:
        self.epoch, self._valid_until = None, None


def describe_leader(lease: Lease | None, now: datetime) -> str:
    """One line for `fleet status`: who plans, at which epoch, and for how long yet."""
    if lease is None:
        return "planner: no leader yet (no cohort run has planned against this store)"
    left = (lease.expires_at - now).total_seconds()
    if left < 0:
        return (
            f"planner: none live — last {lease.holder} (epoch {lease.epoch}), "
            f"expired {-left:.0f} s ago"
        )
    return f"planner: {lease.holder} (epoch {lease.epoch}), lease expires in {left:.0f} s"
