"""The Dispatcher protocol on the mesh queue: the pipeline enqueues work, node agents run it."""

from __future__ import annotations

from datetime import timedelta

from fleet.clients.base import Command
from fleet.clock import Clock
from fleet.errors import DispatchError, DispatchTimeout, UnknownTask
from fleet.mesh.store import MeshStore, TaskStatus

_FAILED = (TaskStatus.FAILED, TaskStatus.DEAD_LETTER, TaskStatus.EXPIRED)


class MeshDispatcher:
    """spawn → any worker; dispatch → one machine; poll_and_retrieve waits on the injected clock.

    The queue reads are short store calls; the wait between them is the clock's `asleep`.
    """

    def __init__(
        self,
        store: MeshStore,
        clock: Clock,
        poll_seconds: float = 5.0,
        *,
        kind: str = "agent",
        mesh_id: str | None = None,
    ):
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.store = store
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.kind = kind
        self.mesh_id = mesh_id or None  # only this mesh's machines claim its tasks (None = any)

    @classmethod
    def from_settings(cls, settings, load_block=None) -> MeshDispatcher:
        """FLEET_DISPATCHER=mesh: the pipeline's work goes to our node agents via the mesh store."""
        from fleet.clock import SystemClock
        from fleet.mesh.open import mesh_store_url, open_mesh_store

        return cls(
            open_mesh_store(mesh_store_url(settings, load_block)),
            SystemClock(),
            mesh_id=settings.mesh_id or None,
        )

    # The key is accepted for the protocol; the enqueue is one local transaction, never resent.
    async def spawn(self, command: Command, idempotency_key: str | None = None) -> str:
        return self.store.enqueue(self.kind, _argv(command), self.clock.now(), mesh_id=self.mesh_id)

    async def dispatch(
        self, command: Command, target: str, model: str, idempotency_key: str | None = None
    ) -> str:
        if not target:
            raise DispatchError("dispatch needs a target machine id; use spawn() for any worker")
        return self.store.enqueue(
            self.kind,
            _argv(command),
            self.clock.now(),
            target=target,
            model=model or None,
            mesh_id=self.mesh_id,
        )

    async def poll_and_retrieve(self, task_id: str, timeout: float) -> str:
        deadline = self.clock.now() + timedelta(seconds=timeout)
        while True:
            task = self.store.get_task(task_id)
            if task is None:
                raise UnknownTask(
                    f"mesh task {task_id} is not in the queue — was it enqueued on "
                    "this store (check FLEET_STORE_URL)?"
                )
            if task.status is TaskStatus.DONE:
                return task.output or ""
            if task.status in _FAILED:
                where = f" on {task.claimed_by}" if task.claimed_by else ""
                raise DispatchError(
                    f"mesh task {task_id} {task.status.value}{where} after "
                    f"{task.attempts} failed attempt(s): {task.error or 'no reason given'}"
                )
            now = self.clock.now()
            if now >= deadline:
                # The queue has no cancel: the task stays queued/claimed and the reconciler
                # expires it; the caller decides whether to wait again or give up.
                raise DispatchTimeout(
                    f"mesh task {task_id} still {task.status.value} after {timeout:g}s"
                    + (
                        f" (claimed by {task.claimed_by})"
                        if task.claimed_by
                        else " (no worker claimed it — are node agents running?)"
                    )
                )
            await self.clock.asleep(min(self.poll_seconds, (deadline - now).total_seconds()))


def _argv(command: Command) -> list[str]:
    if isinstance(command, str):
        # A string would be split into characters; the protocol is argv.
        raise DispatchError(f"command must be an argument list, not the string {command[:60]!r}")
    argv = [str(part) for part in command]
    if not argv:
        raise DispatchError("cannot dispatch an empty command")
    return argv
