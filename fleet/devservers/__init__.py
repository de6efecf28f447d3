"""Local stand-ins for AuraGateway and Hydra, with injectable faults, for tests and trials."""

from fleet.devservers.aura import AuraDevServer, AuraFaults
from fleet.devservers.base import DevServer, Faults
from fleet.devservers.hydra import HydraDevServer

__all__ = ["AuraDevServer", "AuraFaults", "DevServer", "Faults", "HydraDevServer"]
