"""The node agent: heartbeats, claims mesh work, runs it in tmux panes, reports what panes do.

One agent per machine. `tick()` does whatever is due on the injected clock:
heartbeat (every heartbeat_seconds), claim (every claim_seconds, workers and planners with a
free pane), inject claimed work (claimed → injected), read pane output (→ running, progress,
DONE/FAILED markers → done/failed), respawn dead panes, and hand a task off when the pane's
context budget reaches context_handoff_ratio. Active tasks are persisted to `state_path` and
re-adopted after a restart; the store's `tasks_of(machine_id)` is the source of truth (each
claim round also adopts claims it holds there but never heard of). Every write names the
claim it belongs to (`claim_seq`), so an old attempt of a task claimed again is refused.

Pane protocol (what the agent in the pane sees and must answer):
  in:  "TASK <task_id> <command joined by spaces>[ [checkpoint: …]]"
  out: "DONE <task_id>" on a line of its own when finished (the lines between the TASK echo
       and DONE are the output), or "FAILED <task_id> <reason>".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import tempfile
import threading
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fleet.clock import Clock
from fleet.errors import ConfigError, FleetError
from fleet.mesh import END_PROTOCOL, immune, metabolism
from fleet.mesh.health import HealthServer
from fleet.mesh.immune import ImmunePolicy, Observation, Subject, SubjectState
from fleet.mesh.immune_feed import APPLIED
from fleet.mesh.immune_store import ImmuneStore
from fleet.mesh.store import (
    SUPPORTED_GENERATIONS,
    MachineIdentity,
    MeshStore,
    QueuedTask,
    TaskStatus,
)
from fleet.mesh.tmux import PaneControl
from fleet.settings import FleetSettings

log = logging.getLogger(__name__)

CLAIMING_ROLES = ("worker", "planner")
# The checkpoint rides on the single TASK line; a cooked tty truncates lines past 4095 bytes.
CHECKPOINT_CHARS = 1000
# Scripted-agent and tty noise that is not part of a task's output.
_NOISE = re.compile(r"^(ACK [0-9a-f]{40}|\s*context:\s*\d+(\.\d+)?\s*%)\s*$", re.IGNORECASE)


@dataclass
class ActiveTask:
    """What the agent remembers about a task it holds (persisted across restarts)."""

    task_id: str
    text: str  # what is typed into the pane
    status: str = TaskStatus.CLAIMED.value
    pane_id: str | None = None
    injected: bool = False  # typed into `pane_id` (False → inject when a pane is free)
    digest: str | None = None  # hash of the pane output last reported as progress
    respawns: int = 0  # times the pane's agent died while running this task
    claim_seq: int | None = None  # the store's claim we hold; our writes name it (fencing)

    @classmethod
    def of(cls, task: QueuedTask) -> ActiveTask:
        return cls(
            task_id=task.task_id,
            text=task_text(task),
            status=task.status.value,
            claim_seq=task.claim_seq,
        )


def task_text(task: QueuedTask) -> str:
    """The single line typed into the pane for `task`."""
    text = f"TASK {task.task_id} {' '.join(task.command)}".rstrip()
    if task.checkpoint:
        flat = " ⏎ ".join(line.strip() for line in task.checkpoint.splitlines() if line.strip())
        text += f" [checkpoint: {flat[-CHECKPOINT_CHARS:]}]"
    # Tells an LLM agent (Claude Code) how to report the end; worded so the echo of this
    # line never contains the end marker itself.
    return text + END_PROTOCOL


def task_section(pane_text: str, task_id: str) -> str | None:
    """The pane text after the echo of the task's TASK line, or None if it is not visible."""
    start = pane_text.rfind(f"TASK {task_id}")
    if start < 0:
        return None
    end_of_line = pane_text.find("\n", start)
    return "" if end_of_line < 0 else pane_text[end_of_line + 1 :]


def finished(section: str, task_id: str) -> tuple[TaskStatus, str] | None:
    """(done, output) or (failed, reason) once the pane shows the task's end marker."""
    lines = section.splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped == f"DONE {task_id}":
            output = "\n".join(x for x in lines[:index] if not _NOISE.match(x)).strip()
            return TaskStatus.DONE, output
        if stripped.startswith(f"FAILED {task_id}"):
            reason = stripped[len(f"FAILED {task_id}") :].strip() or "the agent reported failure"
            return TaskStatus.FAILED, reason
    return None


def check_identity(identity: MachineIdentity, expected_mesh_id: str | None) -> None:
    """Refuse to run with a mesh id or protocol generation this mesh does not speak."""
    if identity.generation not in SUPPORTED_GENERATIONS:
        supported = ", ".join(str(g) for g in sorted(SUPPORTED_GENERATIONS))
        raise ConfigError(
            f"machine {identity.machine_id} speaks protocol generation {identity.generation}; "
            f"this mesh supports {supported} — upgrade the agent (or the mesh) so they match"
        )
    if expected_mesh_id and identity.mesh_id != expected_mesh_id:
        raise ConfigError(
            f"machine {identity.machine_id} belongs to mesh {identity.mesh_id!r} but this agent is "
            f"configured for mesh {expected_mesh_id!r} — fix --mesh-id or FLEET_MESH_ID"
        )


class NodeAgent:
    def __init__(
        self,
        identity: MachineIdentity,
        store: MeshStore,
        panes: PaneControl,
        *,
        clock: Clock,
        settings: FleetSettings,
        agent_command: list[str],
        state_path: Path,
        expected_mesh_id: str | None = None,
        session: str | None = None,
        pane_count: int | None = None,
        health_port: int | None = None,
        health_host: str = "0.0.0.0",
        advertise_host: str | None = None,
        account: str | None = None,
    ):
        check_identity(
            identity, expected_mesh_id if expected_mesh_id is not None else settings.mesh_id
        )
        if not agent_command and identity.role != "viewer":
            raise ConfigError(
                f"machine {identity.machine_id} has no agent command — "
                'give --agent-command, e.g. "claude"'
            )
        self.identity = identity
        self.store = store
        self.panes = panes
        self.clock = clock
        self.settings = settings
        self.agent_command = list(agent_command)
        self.state_path = Path(state_path)
        self.session = session or f"fleet-{identity.machine_id}"
        self.pane_count = settings.agent_panes if pane_count is None else pane_count
        self.tasks: dict[str, ActiveTask] = {}
        self.pane_ids: list[str] = []
        self._fresh: set[str] = set()  # (re)started panes that have not been given work yet
        self.last_heartbeat: datetime | None = None
        self._next_heartbeat: datetime | None = None
        self._next_claim: datetime | None = None
        self._started = False
        self._stopping = threading.Event()
        self._lock = threading.RLock()
        self._pane_view: list[dict[str, Any]] = []
        self._status = "starting"
        # The account the panes run under (a rate limit backs it off, not the task or machine).
        self.account = account or settings.agent_account or identity.machine_id
        self.policy = ImmunePolicy.from_settings(settings)
        self._excluded_panes: set[str] = set()
        # What this machine saw lately (feedback metabolism: it paces idle claims).
        self._signals: deque[metabolism.Signal] = deque(maxlen=500)
        self._backoff_until: datetime | None = None
        self._health = (
            HealthServer(
                self.health_snapshot,
                host=health_host,
                port=health_port,
                advertise_host=advertise_host or self.settings.agent_advertise_host,
                metrics=self.metrics_text,
                token=(
                    settings.agent_health_token.get_secret_value()
                    if settings.agent_health_token
                    else None
                ),
            )
            if health_port is not None
            else None
        )

    # -- identity ------------------------------------------------------------------------
    @property
    def machine_id(self) -> str:
        return self.identity.machine_id

    @property
    def claims(self) -> bool:
        return self.identity.role in CLAIMING_ROLES

    @property
    def health_url(self) -> str | None:
        return self._health.url if self._health else None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Open the health endpoint, adopt surviving panes and tasks, fill up the panes."""
        if self._started:
            return
        if self._health is not None:
            self._health.start()
        with self._lock:
            self._readopt()
            self._started = True
            self._status = "ok"
            self._save_state()

    def tick(self) -> None:
        """Do whatever is due now; safe to call as often as wanted."""
        if not self._started:
            self.start()
        with self._lock:
            now = self.clock.now()
            if self._next_heartbeat is None or now >= self._next_heartbeat:
                self._heartbeat(now)
            if self.claims:
                self._supervise_panes(now)
                self._watch_tasks(now)
                if self._next_claim is None or now >= self._next_claim:
                    self._claim(now)
                self._inject_pending(now)
            self._refresh_view()
            self._save_state()

    def shutdown(self) -> int:
        """Announce leaving (the store requeues our claims), stop pane work and the endpoint."""
        with self._lock:
            if self._status == "left":
                return 0
            self._status = "leaving"
            requeued = 0
            try:
                requeued = self.store.leave(self.machine_id, self.clock.now())
            except Exception:
                log.exception(
                    "could not announce leaving for %s; the reconciler will requeue its claims",
                    self.machine_id,
                )
            # Our claims are someone else's work now: stop it here so it never runs twice.
            for task in list(self.tasks.values()):
                if task.pane_id and task.injected:
                    self._restart_pane(task.pane_id)
            self.tasks.clear()
            self._save_state()
            self._refresh_view()
            self._status = "left"
        if self._health is not None:
            self._health.stop()
        self._stopping.set()
        log.info("machine %s left the mesh; %d claim(s) requeued", self.machine_id, requeued)
        return requeued

    def stop(self) -> None:
        """Ask run_forever to finish (it calls shutdown)."""
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask the loop to stop (then it leaves the mesh); main thread only."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stopping.set())

    def run_forever(self) -> None:
        """Tick until SIGTERM/SIGINT or stop(), then leave the mesh gracefully."""
        self.install_signal_handlers()
        self.start()
        try:
            while not self._stopping.is_set():
                try:
                    self.tick()
                except FleetError as exc:
                    log.warning("tick failed on %s: %s", self.machine_id, exc)
                except Exception:
                    log.exception("tick failed on %s; continuing", self.machine_id)
                self._stopping.wait(self.settings.agent_tick_seconds)
        finally:
            self.shutdown()

    # -- claim ---------------------------------------------------------------------------
    def free_panes(self) -> list[str]:
        """Live panes without a task, except those the immune system excludes (a crash-looping
        pane gets work again when its exclusion ends: that task is its probe)."""
        busy = {t.pane_id for t in self.tasks.values() if t.pane_id}
        return [
            p
            for p in self.pane_ids
            if p not in busy and p not in self._excluded_panes and self.panes.is_alive(p)
        ]

    def _read_immunity(self, now: datetime) -> None:
        """This machine's pane exclusions and its account's rate-limit backoff, from the store."""
        if not hasattr(self.store, "immune_states"):
            return
        prefix = f"{self.machine_id}/"
        excluded, backoff = set(), None
        for state in self.store.immune_states():
            if state.subject.kind == "pane" and state.subject.key.startswith(prefix):
                if state.excluded(now):
                    excluded.add(state.subject.key[len(prefix) :])
            elif state.subject == Subject.account(self.account) and state.backing_off(now):
                backoff = state.backoff_until
        self._excluded_panes, self._backoff_until = excluded, backoff

    def claim_work(self, limit: int) -> list[QueuedTask]:
        """Claim up to `limit` tasks for this machine (viewers never claim)."""
        if not self.claims or limit <= 0:
            return []
        claimed = self.store.claim(self.machine_id, self.clock.now(), limit=limit)
        with self._lock:
            for task in claimed:
                self._adopt(task)
        return claimed

    def _adopt(self, task: QueuedTask) -> ActiveTask:
        """Hold the store's claim `task`; an older attempt of it still held here is stopped first
        (it was requeued and claimed again: its pane must not keep running it)."""
        old = self.tasks.get(task.task_id)
        if old is not None and old.claim_seq in (task.claim_seq, None):
            old.claim_seq = task.claim_seq  # None: persisted by an agent that did not fence
            return old
        if old is not None:
            self._lost(old, f"it was requeued and claimed again (claim {task.claim_seq})")
        self.tasks[task.task_id] = ActiveTask.of(task)
        return self.tasks[task.task_id]

    def _verify_claims(self) -> None:
        """Match our tasks to the store's claims. Drop (and stop) tasks the store requeued
        behind our back, e.g. while we were declared down: another machine may be running them
        now. Adopt claims the store holds for us that we never heard of (the claim committed
        but its answer was lost), as after a restart."""
        ours = {t.task_id: t for t in self.store.tasks_of(self.machine_id)}
        for task in list(self.tasks.values()):
            if task.task_id not in ours:
                self._lost(
                    task,
                    "the store requeued it: this machine was declared down, or the "
                    "reconciler found the claim orphaned or stuck",
                )
        for claimed in ours.values():
            if claimed.task_id not in self.tasks:
                log.warning(
                    "adopting task %s: the store lists it as claimed by %s, this agent "
                    "did not know (a claim whose answer was lost)",
                    claimed.task_id,
                    self.machine_id,
                )
            self._adopt(claimed)

    def _claim(self, now: datetime) -> None:
        try:
            self._verify_claims()
            self._read_immunity(now)
            if self._backoff_until is not None:
                log.info(
                    "account %s is rate-limited until %s; %s claims nothing until then",
                    self.account,
                    self._backoff_until.isoformat(),
                    self.machine_id,
                )
                self._next_claim = min(
                    self._backoff_until, now + _seconds(self.settings.claim_seconds)
                )
                return
            free = len(self.free_panes()) - sum(1 for t in self.tasks.values() if t.pane_id is None)
            claimed = self.claim_work(free)
        except FleetError as exc:
            log.warning("claim failed on %s: %s; retrying next tick", self.machine_id, exc)
            return
        self._next_claim = now + _seconds(self.claim_interval(now, bool(claimed)))

    def metabolism(self, now: datetime) -> float:
        return metabolism.metabolism(self._signals, now)

    def claim_interval(self, now: datetime, claimed: bool) -> float:
        """claim_seconds while work flows; with pacing on, an empty round waits the metabolism's
        pace (30 s busy … 300 s quiet)."""
        if claimed or not self.settings.agent_metabolism_pacing:
            return self.settings.claim_seconds
        return metabolism.pace(
            self.metabolism(now),
            self.settings.metabolism_min_interval_seconds,
            self.settings.metabolism_max_interval_seconds,
        )

    def _ready(self, pane_id: str) -> bool:
        """The pane's agent has drawn something (typing before that may be echoed or lost) and
        has context left (a pane past the budget is restarted instead of given work)."""
        try:
            text = self.panes.read_pane(pane_id, 200)
        except FleetError:
            return False
        if not text.strip():
            return False
        ratio = self.panes.context_ratio(text)
        # A freshly started agent is as fresh as it gets: restarting it again would loop.
        if (
            pane_id not in self._fresh
            and ratio is not None
            and ratio >= self.settings.context_handoff_ratio
        ):
            log.info(
                "pane %s is at context %.0f%%; restarting it before giving it work",
                pane_id,
                ratio * 100,
            )
            self._restart_pane(pane_id)
            return False
        return True

    def _inject_pending(self, now: datetime) -> None:
        if all(t.injected for t in self.tasks.values()):
            return
        free = [p for p in self.free_panes() if self._ready(p)]
        for task in list(self.tasks.values()):
            if task.injected:
                continue
            if task.pane_id is None:
                if not free:
                    continue
                task.pane_id = free.pop(0)
            elif not self._ready(task.pane_id):
                continue  # respawned for this task; type it once the agent is up
            self._inject(task, task.pane_id, now)

    def _inject(self, task: ActiveTask, pane_id: str, now: datetime) -> None:
        self.panes.inject(pane_id, task.text)
        self._fresh.discard(pane_id)
        task.injected = True
        task.digest = None
        if task.status == TaskStatus.CLAIMED.value:
            ok = self.store.transition(
                task.task_id,
                self.machine_id,
                TaskStatus.INJECTED,
                now,
                pane_id=pane_id,
                claim_seq=task.claim_seq,
            )
            task.status = TaskStatus.INJECTED.value
        else:
            ok = self.store.progress(
                task.task_id,
                self.machine_id,
                now,
                note=f"re-injected into pane {pane_id}",
                claim_seq=task.claim_seq,
            )
        if not ok:
            self._lost(task, "the store no longer lists it as ours")

    # -- watch ---------------------------------------------------------------------------
    def _watch_tasks(self, now: datetime) -> None:
        for task in list(self.tasks.values()):
            self._watch(task, now)

    def _watch(self, task: ActiveTask, now: datetime) -> None:
        """Read the task's pane: finish it, report progress, or hand off at the context budget."""
        if task.task_id not in self.tasks or not task.injected or task.pane_id is None:
            return
        try:
            text = self.panes.read_pane(task.pane_id, self.settings.agent_capture_lines)
        except FleetError as exc:
            log.warning("cannot read pane %s for task %s: %s", task.pane_id, task.task_id, exc)
            return
        section = task_section(text, task.task_id)
        if section is None:
            return
        end = finished(section, task.task_id)
        if end is not None and end[0] is TaskStatus.FAILED and immune.is_rate_limit(end[1]):
            self._rate_limited(task, end[1], now)
            return
        if (
            end is not None
            and end[0] is TaskStatus.FAILED
            and self._apply_antibody(task, end[1], now)
        ):
            return
        if end is not None:
            status, detail = end
            self._signals.extend(
                metabolism.signals_from_events(
                    [{"event": status.value, "at": now, "task_type": None}]
                )
            )
            kwargs = {"output": detail} if status is TaskStatus.DONE else {"error": detail}
            if task.status == TaskStatus.INJECTED.value:
                self.store.transition(
                    task.task_id, self.machine_id, TaskStatus.RUNNING, now, claim_seq=task.claim_seq
                )
            self.store.transition(
                task.task_id, self.machine_id, status, now, claim_seq=task.claim_seq, **kwargs
            )
            del self.tasks[task.task_id]
            return
        digest = hashlib.sha1(section.encode("utf-8")).hexdigest() if section.strip() else None
        if digest is not None and digest != task.digest:
            task.digest = digest
            if task.status == TaskStatus.INJECTED.value:
                ok = self.store.transition(
                    task.task_id, self.machine_id, TaskStatus.RUNNING, now, claim_seq=task.claim_seq
                )
                task.status = TaskStatus.RUNNING.value
            else:
                ok = self.store.progress(
                    task.task_id, self.machine_id, now, claim_seq=task.claim_seq
                )
            if not ok:
                self._lost(task, "the store no longer lists it as ours")
                return
        ratio = self.panes.context_ratio(text)
        if ratio is not None and ratio >= self.settings.context_handoff_ratio:
            self._handoff(task, section, ratio, now)

    def _rate_limited(self, task: ActiveTask, message: str, now: datetime) -> None:
        """A rate limit is not the task's failure: requeue it without spending an attempt and
        back the account off until the reset the message names (DESIGN §9)."""
        if isinstance(self.store, ImmuneStore):
            self.store.requeue_unattempted(
                task.task_id, self.machine_id, now, message, claim_seq=task.claim_seq
            )
            subject = Subject.account(self.account)
            state = next(
                (s for s in self.store.immune_states("account") if s.subject == subject),
                SubjectState(subject),
            )
            state, actions = immune.observe(
                state, Observation(subject, now, "rate_limited", message), self.policy
            )
            self.store.save_immune([state], actions, self.policy, now)
            self._backoff_until = state.backoff_until
            self._next_claim = state.backoff_until
        log.warning(
            "task %s hit a rate limit on account %s (%s); requeued, claims paused until %s",
            task.task_id,
            self.account,
            message[:200],
            self._backoff_until.isoformat() if self._backoff_until else "the next round",
        )
        del self.tasks[task.task_id]

    def _apply_antibody(self, task: ActiveTask, reason: str, now: datetime) -> bool:
        """A failure whose signature has a learned corrective (an antibody that worked more
        often than not, anywhere in the mesh) gets that corrective instead of failing the task:
        respawn_pane → a fresh agent in the pane retypes it; retry / requeue_elsewhere → back to
        the queue (no attempt spent); backoff_account → the rate-limit path. Once per task: the
        AntibodyApplied event, recorded first, is the guard and the immune system's failure."""
        if not isinstance(self.store, ImmuneStore):
            return False
        signature = immune.failure_signature(reason)
        corrective = immune.learned_corrective(signature, self.store.antibodies())
        if corrective not in ANTIBODY_CORRECTIVES or self.store.events(task.task_id, event=APPLIED):
            return False
        self.store.record_event(
            task.task_id,
            APPLIED,
            self.machine_id,
            now,
            {
                "signature": signature,
                "corrective": corrective,
                "error": reason,
                "pane_id": task.pane_id,
            },
        )
        log.info("task %s failed (%s); applying learned %s", task.task_id, reason[:200], corrective)
        if corrective == "backoff_account":
            self._rate_limited(task, reason, now)
        elif corrective == "respawn_pane":
            self._restart_pane(task.pane_id)
            task.injected, task.digest = False, None  # retyped once the fresh agent is up
        else:
            note = f"failed ({reason}); requeued by the learned corrective {corrective}"
            self.store.handoff(task.task_id, self.machine_id, now, note, claim_seq=task.claim_seq)
            del self.tasks[task.task_id]
            self._restart_pane(task.pane_id)
        return True

    def _handoff(self, task: ActiveTask, section: str, ratio: float, now: datetime) -> None:
        lines = [x for x in section.splitlines() if x.strip() and not _NOISE.match(x)]
        checkpoint = "\n".join(lines[-20:]) or f"context budget reached at {ratio:.0%}"
        self.store.handoff(task.task_id, self.machine_id, now, checkpoint, claim_seq=task.claim_seq)
        log.info(
            "task %s handed off at context %.0f%%; pane %s restarted",
            task.task_id,
            ratio * 100,
            task.pane_id,
        )
        del self.tasks[task.task_id]
        self._restart_pane(task.pane_id)

    def _lost(self, task: ActiveTask, why: str) -> None:
        """The store gave the task to someone else: forget it and stop its work here."""
        log.warning(
            "task %s is no longer ours (%s); stopping it in pane %s",
            task.task_id,
            why,
            task.pane_id,
        )
        self.tasks.pop(task.task_id, None)
        if task.pane_id and task.injected:
            self._restart_pane(task.pane_id)

    # -- panes ---------------------------------------------------------------------------
    def _supervise_panes(self, now: datetime) -> None:
        existing = {p.pane_id: p for p in self.panes.list_panes(self.session)}
        for pane_id in list(self.pane_ids):
            info = existing.get(pane_id)
            if info is not None and self.panes.is_alive(pane_id):
                continue
            task = next((t for t in self.tasks.values() if t.pane_id == pane_id), None)
            if task is not None and info is not None:
                # The agent may have finished the task just before it exited: read that first.
                self._watch(task, now)
                if task.task_id not in self.tasks:
                    task = None
            if info is None:
                # The pane is gone (tmux restarted, someone killed it): make a new one.
                self.pane_ids.remove(pane_id)
                new_id = self._spawn_pane()
                self.pane_ids.append(new_id)
                note = f"pane {pane_id} vanished; agent restarted in new pane {new_id}"
                if task is not None:
                    task.pane_id = new_id
            else:
                self.panes.respawn(pane_id, self.agent_command)
                self._fresh.add(pane_id)
                note = f"agent in pane {pane_id} exited; respawned"
            log.warning("%s on %s", note, self.machine_id)
            self._signals.append(metabolism.Signal("crash_rate", now, 0.0))
            if hasattr(self.store, "record_event"):  # the immune system counts pane deaths
                try:
                    self.store.record_event(
                        task.task_id if task else None,
                        "PaneRespawned",
                        self.machine_id,
                        now,
                        {"pane_id": pane_id, "note": note},
                    )
                except FleetError as exc:
                    log.warning("could not record the respawn of pane %s: %s", pane_id, exc)
            if task is None:
                continue
            task.respawns += 1
            task.injected = False  # typed again on this tick, into the fresh agent
            if task.respawns > self.settings.max_task_attempts:
                self.store.transition(
                    task.task_id,
                    self.machine_id,
                    TaskStatus.FAILED,
                    now,
                    error=f"{note} {task.respawns} times while running this task",
                    claim_seq=task.claim_seq,
                )
                del self.tasks[task.task_id]
            elif not self.store.progress(
                task.task_id, self.machine_id, now, note=note, claim_seq=task.claim_seq
            ):
                self._lost(task, "the store no longer lists it as ours")
        while len(self.pane_ids) < self.pane_count:
            self.pane_ids.append(self._spawn_pane())

    def _spawn_pane(self) -> str:
        pane_id = self.panes.spawn(self.session, self.agent_command)
        self._fresh.add(pane_id)
        return pane_id

    def _restart_pane(self, pane_id: str | None) -> None:
        if pane_id is None:
            return
        try:
            self.panes.respawn(pane_id, self.agent_command)
            self._fresh.add(pane_id)
        except FleetError as exc:
            log.warning("could not restart pane %s: %s", pane_id, exc)

    # -- heartbeat -----------------------------------------------------------------------
    def _heartbeat(self, now: datetime) -> None:
        try:
            self.store.heartbeat(self.identity, now, self.health_url, sorted(self.tasks))
            for view in self._pane_view:
                self.store.set_pane_state(
                    self.machine_id,
                    view["pane_id"],
                    now,
                    task_id=view["task_id"],
                    alive=view["alive"],
                    context_ratio=view["context_ratio"],
                    claim_seq=view["claim_seq"],
                )
        except FleetError as exc:
            # A failed write is not a reason to stop: the next tick tries again.
            log.warning("heartbeat failed on %s: %s", self.machine_id, exc)
            return
        self.last_heartbeat = now
        self._next_heartbeat = now + _seconds(self._heartbeat_seconds())

    # The healing policy this machine runs: read once per heartbeat from the policy tables
    # beside the mesh store (fleet.tuning.policies), the last answer kept through an outage.
    _policy_store: Any = None
    _policy_store_opened = False
    _in_force: Any = None

    def _heartbeat_seconds(self) -> float:
        """The heartbeat interval of the policy this machine runs: a canary trial's candidate
        when it is on one, else the policy in force, else the settings'."""
        from fleet.tuning.policies import policy_store_beside, read_in_force

        if not self._policy_store_opened:
            self._policy_store_opened = True
            self._policy_store = policy_store_beside(self.store)
        self._in_force = read_in_force(self._policy_store, self._in_force)
        return float(self._in_force.settings_for(self.settings, self.machine_id).heartbeat_seconds)

    # -- restart -------------------------------------------------------------------------
    def _readopt(self) -> None:
        saved = self._load_state()
        existing = {p.pane_id for p in self.panes.list_panes(self.session)}
        saved_panes = [p for p in saved.get("panes", []) if p in existing]
        self.pane_ids = saved_panes + sorted(existing - set(saved_panes))
        saved_tasks = {tid: ActiveTask(**row) for tid, row in saved.get("tasks", {}).items()}
        ours = {t.task_id: t for t in self.store.tasks_of(self.machine_id)} if self.claims else {}
        for task_id, row in ours.items():
            local = saved_tasks.get(task_id)
            if local is not None and local.claim_seq not in (row.claim_seq, None):
                # Requeued and claimed again while we were away: the old attempt must stop.
                if local.pane_id in existing and local.injected:
                    self._restart_pane(local.pane_id)
                local = None
            if local is None or local.pane_id not in existing:
                local = ActiveTask.of(row)
            local.status, local.claim_seq = row.status.value, row.claim_seq
            self.tasks[task_id] = local
        for task_id, local in saved_tasks.items():
            if task_id not in ours and local.pane_id in existing and local.injected:
                # Requeued while we were away: whatever still runs it here must stop.
                log.warning(
                    "task %s was requeued while %s was away; stopping it in pane %s",
                    task_id,
                    self.machine_id,
                    local.pane_id,
                )
                self._restart_pane(local.pane_id)
        if self.tasks:
            log.info(
                "re-adopted %d task(s) on %s: %s",
                len(self.tasks),
                self.machine_id,
                ", ".join(sorted(self.tasks)),
            )
        if self.claims:
            self._supervise_panes(self.clock.now())

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning(
                "ignoring unreadable agent state %s (%s); the store's claims are used",
                self.state_path,
                exc,
            )
            return {}
        if data.get("machine_id") != self.machine_id:
            log.warning(
                "agent state %s belongs to machine %r, not %r; ignored",
                self.state_path,
                data.get("machine_id"),
                self.machine_id,
            )
            return {}
        return data

    def _save_state(self) -> None:
        data = {
            "machine_id": self.machine_id,
            "mesh_id": self.identity.mesh_id,
            "session": self.session,
            "panes": self.pane_ids,
            "tasks": {tid: asdict(t) for tid, t in self.tasks.items()},
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".agent-state-", dir=self.state_path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.state_path)  # atomic: a crash leaves the old or the new file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- health --------------------------------------------------------------------------
    def _refresh_view(self) -> None:
        by_pane = {t.pane_id: t for t in self.tasks.values() if t.pane_id}
        view = []
        for pane_id in self.pane_ids:
            alive = self.panes.is_alive(pane_id)
            ratio = None
            if alive:
                try:
                    ratio = self.panes.context_ratio(self.panes.read_pane(pane_id, 200))
                except FleetError:
                    alive = False
            task = by_pane.get(pane_id)
            view.append(
                {
                    "pane_id": pane_id,
                    "alive": alive,
                    "task_id": task and task.task_id,
                    "claim_seq": task and task.claim_seq,
                    "context_ratio": ratio,
                }
            )
        self._pane_view = view

    def metrics_text(self) -> bytes:
        """GET /metrics: the mesh's Prometheus metrics as this agent's store has them."""
        from fleet.metrics import mesh_metrics, render

        with self._lock:
            return render(mesh_metrics(self.store, self.clock.now()))

    def health_snapshot(self) -> dict[str, Any]:
        with self._lock:
            dead = [v["pane_id"] for v in self._pane_view if not v["alive"]]
            status = self._status if self._status != "ok" or not dead else "degraded"
            return {
                "identity": self.identity.model_dump(),
                "status": status,
                "last_heartbeat": self.last_heartbeat.isoformat() if self.last_heartbeat else None,
                "active_tasks": [
                    {"task_id": t.task_id, "status": t.status, "pane_id": t.pane_id}
                    for t in sorted(self.tasks.values(), key=lambda t: t.task_id)
                ],
                "panes": list(self._pane_view),
            }


# The learned correctives a node agent can apply to a failed task (fleet/mesh/immune.py).
ANTIBODY_CORRECTIVES = frozenset(immune.INNATE_CORRECTIVE.values())


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
