"""The one definition of "in flight" that DISCOVER and the claim share (pure)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime

from fleet.models import EvolutionState

DeadOwner = Callable[[str], bool]


def in_flight(state: EvolutionState, now: datetime, dead_owner: DeadOwner) -> bool:
    """True iff a run holds the app: it has an owner whose lease has not expired and that
    owner is not known to be dead.

    `dead_owner(owner)` answers what this process can know for sure — today a pid on this
    host that no longer runs (`dead_on_this_host`). An owner on another host is taken at its
    word until its lease runs out, which the heartbeat keeps short (app_lease_seconds).
    The lease comparison is the store's: a claim is free once `lease_until < now`.
    """
    if state.owner is None or state.lease_until is None or state.lease_until < now:
        return False
    return not dead_owner(state.owner)


def steal_from(state: EvolutionState, now: datetime, dead_owner: DeadOwner) -> str | None:
    """The owner a claim may take the app from at once (`Store.claim_app(steal_from=…)`):
    a holder with a live lease that is known dead. None when there is nothing to steal —
    the app is free, expired (any claim takes it) or in flight."""
    if state.owner is None or state.lease_until is None or state.lease_until < now:
        return None
    return state.owner if dead_owner(state.owner) else None


def dead_on_this_host(owner: str) -> bool:
    """`owner` ("host:pid") names a process on this host that no longer runs."""
    return dead_local_owner(owner) is not None


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local_owner(owner: str | None) -> str | None:
    """The owner string if it names a process on this host that no longer runs, else None.

    Lets a rerun after a crash take its app back at once instead of waiting out the lease.
    """
    if not owner or ":" not in owner:
        return None
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    import psutil  # only when asked

    try:
        proc = psutil.Process(int(pid))
        alive = proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    return None if alive else owner
