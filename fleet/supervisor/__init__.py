"""The immutable supervisor: guards agent changes to app repos and keeps helper processes alive."""

from fleet.supervisor.guard import ChangeGuard, GuardVerdict, Snapshot

__all__ = ["ChangeGuard", "GuardVerdict", "Snapshot"]
