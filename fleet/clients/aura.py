"""AuraGateway client: the production Dispatcher (spawn / dispatch / poll a task over HTTP)."""

from __future__ import annotations

import logging
import random
import shlex
from datetime import timedelta
from typing import Unpack

from pydantic import SecretStr

from fleet.clients.base import Command
from fleet.clients.transport import (
    EndpointOptions,
    JsonEndpoint,
    ServiceClient,
    ServiceInfo,
    excerpt,
)
from fleet.errors import (
    AgentFailed,
    DispatchError,
    DispatchTimeout,
    GatewayUnavailable,
    UnknownTask,
)

log = logging.getLogger("fleet.aura")

AURA = ServiceInfo(
    name="AuraGateway",
    key="aura",
    token_hint="the AuraGateway block / FLEET_AURA_TOKEN",
    error=DispatchError,
    unavailable=GatewayUnavailable,
)

PENDING = ("queued", "running")
MAX_OUTPUT_ERROR = 2000


def _command_string(command: Command) -> str:
    if isinstance(command, (str, bytes)):
        # A bare string would be joined character by character; argv lists only.
        raise TypeError(
            "command must be an argument list (e.g. ['claude', '-p', prompt]), not a string"
        )
    argv = [str(part) for part in command]
    if not argv:
        raise ValueError("command is empty: nothing to send to AuraGateway")
    return shlex.join(argv)


class AuraGatewayDispatcher(ServiceClient):
    """Dispatcher over AuraGateway's HTTP API (DESIGN §4).

    `POST /spawn {command}` and `POST /dispatch {command, target, model}` return `{task_id}`;
    `GET /tasks/{id}` returns `{status, output, error}`. Commands are argv lists sent as
    `shlex.join(command)`, which the gateway splits back without a shell.
    """

    service = AURA

    def __init__(
        self,
        base_url: str,
        token: SecretStr | None = None,
        *,
        poll_initial: float = 2.0,
        poll_max: float = 60.0,
        rng: random.Random | None = None,
        **endpoint: Unpack[EndpointOptions],
    ):
        if poll_initial <= 0 or poll_max < poll_initial:
            raise ValueError(
                "poll_initial must be > 0 and poll_max >= poll_initial "
                f"(got {poll_initial}, {poll_max})"
            )
        super().__init__(base_url, token, **endpoint)
        self.poll_initial = poll_initial
        self.poll_max = poll_max
        self._rng = rng or random.Random()

    # -- Dispatcher ------------------------------------------------------------------------

    async def spawn(self, command: Command, idempotency_key: str | None = None) -> str:
        return await self._start("/spawn", {"command": _command_string(command)}, idempotency_key)

    async def dispatch(
        self, command: Command, target: str, model: str, idempotency_key: str | None = None
    ) -> str:
        return await self._start(
            "/dispatch",
            {"command": _command_string(command), "target": target, "model": model},
            idempotency_key,
        )

    async def poll_and_retrieve(self, task_id: str, timeout: float) -> str:
        """Poll `GET /tasks/{id}` with doubling, jittered waits until done, failed or `timeout`."""
        deadline = self.clock.now() + timedelta(seconds=timeout)
        delay = self.poll_initial
        polls = 0
        while True:
            body = await self._task(task_id)
            polls += 1
            status = body.get("status")
            if status == "done":
                output = body.get("output")
                return "" if output is None else str(output)
            if status == "failed":
                error = body.get("error") or body.get("output") or "(no error text)"
                raise AgentFailed(
                    f"gateway task {task_id} failed: {str(error)[-MAX_OUTPUT_ERROR:]}"
                )
            if status not in PENDING:
                raise DispatchError(
                    f"gateway task {task_id} has unknown status {excerpt(repr(status), 60)}; "
                    "expected queued, running, done or failed"
                )
            remaining = (deadline - self.clock.now()).total_seconds()
            if remaining <= 0:
                # The gateway contract has no cancel call: the task may go on running there.
                raise DispatchTimeout(
                    f"gateway task {task_id} still {status} after {timeout:g} s "
                    f"({polls} polls); it was not stopped on the gateway — check it there"
                )
            # Doubling with ±20 % jitter, so many runs polling one gateway do not line up.
            wait = min(delay * self._rng.uniform(0.8, 1.2), self.poll_max, remaining)
            await self.clock.asleep(wait)
            delay = min(delay * 2, self.poll_max)

    # -- wire ------------------------------------------------------------------------------

    async def _start(self, path: str, body: dict, idempotency_key: str | None) -> str:
        # Without a key a start is not idempotent: retried by the transport only when the
        # request never left. With one, the gateway answers a repeat with the task the key
        # first started, so 5xx and timeouts are retried like any idempotent call.
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        status, answer = await self._http.acall(
            "POST", path, body=body, idempotent=idempotency_key is not None, headers=headers
        )
        if status == 404:
            raise DispatchError(
                f"AuraGateway at {self._http.shown_url} has no POST {path} (404); check the URL "
                "points at AuraGateway"
            )
        task_id = answer.get("task_id") if isinstance(answer, dict) else None
        if not isinstance(task_id, (str, int)) or isinstance(task_id, bool) or str(task_id) == "":
            raise DispatchError(
                f"AuraGateway answered POST {path} without a task_id: {excerpt(repr(answer))}"
            )
        task_id = str(task_id)
        log.info("AuraGateway %s started task %s", path, task_id)
        return task_id

    async def _task(self, task_id: str) -> dict:
        path = f"/tasks/{JsonEndpoint.segment(task_id)}"
        status, body = await self._http.acall("GET", path, idempotent=True)
        if status == 404:
            raise UnknownTask(
                f"AuraGateway at {self._http.shown_url} does not know task {task_id!r} (404); "
                "the gateway may have restarted — dispatch the command again"
            )
        if not isinstance(body, dict):
            raise DispatchError(
                f"AuraGateway answered GET {path} with {type(body).__name__}, expected an object: "
                f"{excerpt(repr(body))}"
            )
        return body
