"""Protocols for the systems the pipeline talks to: Dispatcher, QualityGate, Extractor.

Their methods are coroutines: a stage waits minutes to hours on an agent or on Hydra, and
that wait must cost a coroutine, not a thread (see README, concurrency model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel

# A command is an argument list; a gateway that wants one string gets shlex.join(command).
Command = Sequence[str]


@runtime_checkable
class Dispatcher(Protocol):
    """Sends agent commands to machines and collects their output (AuraGateway contract)."""

    async def spawn(self, command: Command, idempotency_key: str | None = None) -> str:
        """Start `command` wherever the dispatcher sees fit; returns a task id.

        With an `idempotency_key`, sending the same start again (a retry after a timeout)
        starts nothing new: the dispatcher answers with the task the key first started.
        """

    async def dispatch(
        self, command: Command, target: str, model: str, idempotency_key: str | None = None
    ) -> str:
        """Start `command` on machine `target` with agent `model`; returns a task id."""

    async def poll_and_retrieve(self, task_id: str, timeout: float) -> str:
        """Wait for the task and return its output.

        Raises DispatchTimeout after `timeout` seconds (the work is stopped where the
        dispatcher can stop it), DispatchError when the task failed, UnknownTask when
        the id is not known.
        """


UNKNOWN_PHASE = "unknown"  # the gate has no status for the app: Hydra was never started on it


class GateStatus(BaseModel):
    """Hydra's answer: `GET /status/{app_id}` → phase, cycle, quality.isPassing."""

    phase: str
    cycle: int = 0
    is_passing: bool = False
    score: float | None = None
    detail: str | None = None


@runtime_checkable
class QualityGate(Protocol):
    async def status(self, app_id: str) -> GateStatus: ...


@runtime_checkable
class Extractor(Protocol):
    """Tier 2 of PARSE: an LLM that turns free text into task dicts (priority, description)."""

    async def extract(self, output: str, app_id: str) -> list[dict]: ...
