"""Truthful liveness: a machine is declared down only on repeated evidence, never on our own errors.

One confirmation = the machine's heartbeat is missed (older than two periods) AND its health
endpoint fails a reachability check. After `liveness_confirmations` consecutive failed
confirmations it is marked down and its active claims are requeued. What is NOT evidence:

- the store failing (reading machines or recording a confirmation): nothing is recorded;
- our own network failing: before judging anyone, the probe checks a known-good target —
  `liveness_reference_url` if set, else the health endpoints of up to three peers with
  fresh heartbeats; if none answers, no confirmation is recorded this cycle;
- errors that say nothing about the target (our resolver failing, a bad URL, a local
  socket error, a bug): the outcome is `inconclusive` and the count is left unchanged;
- a machine without a health URL cannot be confirmed dead (the reconciler's orphan rule
  still requeues its silent claims).

An endpoint that answers with any HTTP status is alive: a slow-but-alive agent whose
heartbeat is late is never declared dead.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from enum import Enum

import httpx
from pydantic import BaseModel

from fleet.mesh import rules
from fleet.mesh.store import MeshStore


class Reach(str, Enum):
    REACHABLE = "reachable"  # any HTTP response
    UNREACHABLE = "unreachable"  # evidence: refused, timed out, host unreachable, reset
    INCONCLUSIVE = "inconclusive"  # says nothing about the target


# Errors of the local side: our network or resolver, not the target.
_LOCAL_ERRNOS = {
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EADDRNOTAVAIL,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOBUFS,
    errno.EACCES,
    errno.EPERM,
}
_REMOTE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.EHOSTDOWN,
    errno.ECONNRESET,
    errno.ETIMEDOUT,
}


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def classify_error(exc: BaseException) -> Reach:
    """Is this failure evidence about the target, or about us?"""
    chain = list(_causes(exc))
    if any(isinstance(e, socket.gaierror) for e in chain):
        return Reach.INCONCLUSIVE  # name resolution: our resolver or a renamed host — unknown
    for e in chain:
        if isinstance(e, OSError) and e.errno in _LOCAL_ERRNOS:
            return Reach.INCONCLUSIVE
        if isinstance(e, (ConnectionRefusedError, ConnectionResetError)) or (
            isinstance(e, OSError) and e.errno in _REMOTE_ERRNOS
        ):
            return Reach.UNREACHABLE
    if isinstance(exc, httpx.PoolTimeout):
        return Reach.INCONCLUSIVE  # our connection pool, not the target
    if isinstance(
        exc,
        (
            httpx.ConnectTimeout,
            httpx.ReadTimeout,
            httpx.WriteTimeout,
            httpx.RemoteProtocolError,
            httpx.ConnectError,
            httpx.ReadError,
        ),
    ):
        return Reach.UNREACHABLE
    return Reach.INCONCLUSIVE


class ReachabilityCheck:
    """GET a health URL with a short timeout and say what the outcome is evidence of."""

    def __init__(self, timeout_seconds: float = 2.0, client: httpx.Client | None = None):
        self._client = client or httpx.Client(
            timeout=timeout_seconds, follow_redirects=False, trust_env=False
        )

    def __call__(self, url: str) -> Reach:
        try:
            self._client.get(url)
        except Exception as exc:  # every failure is classified, none escapes as a verdict
            return classify_error(exc)
        return Reach.REACHABLE

    def close(self) -> None:
        self._client.close()


class MachineVerdict(BaseModel):
    machine_id: str
    # alive: endpoint answered (count reset); failed: a confirmation counted;
    # declared_down: this confirmation reached the threshold; inconclusive / store_error:
    # nothing recorded; heartbeat_resumed: it heartbeated while we probed.
    outcome: str
    reach: Reach | None = None
    failed_confirmations: int | None = None
    requeued: int = 0


class LivenessReport(BaseModel):
    at: datetime
    # ok: judged; not_needed: no stale machine; store_error / reference_unreachable: we could
    # not trust ourselves this cycle, so nothing was recorded; no_reference: judged without one.
    self_check: str
    checked: list[MachineVerdict] = []
    declared_down: list[str] = []
    requeued: int = 0
    errors: list[str] = []


class LivenessProbe:
    """One call of `confirm(now)` = one confirmation round over machines with missed heartbeats."""

    def __init__(
        self,
        store: MeshStore,
        *,
        heartbeat_seconds: float,
        confirmations: int,
        max_attempts: int,
        reference_url: str | None = None,
        check: Callable[[str], Reach] | None = None,
        timeout_seconds: float = 2.0,
        heartbeat_by_machine: Mapping[str, float] | None = None,
        confirmations_by_machine: Mapping[str, int] | None = None,
    ):
        self.store = store
        self.heartbeat_seconds = heartbeat_seconds
        self.confirmations = confirmations
        # Machines on a canary policy of their own (fleet.tuning.policies.PoliciesInForce).
        self.heartbeat_by_machine = dict(heartbeat_by_machine or {})
        self.confirmations_by_machine = dict(confirmations_by_machine or {})
        self.max_attempts = max_attempts
        self.reference_url = reference_url or None
        self._owned: ReachabilityCheck | None = None
        if check is None:
            self._owned = check = ReachabilityCheck(timeout_seconds)
        self.check: Callable[[str], Reach] = check

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()

    @classmethod
    def from_settings(cls, store: MeshStore, settings, **overrides) -> LivenessProbe:
        kwargs = dict(
            heartbeat_seconds=settings.heartbeat_seconds,
            confirmations=settings.liveness_confirmations,
            max_attempts=settings.max_task_attempts,
            reference_url=settings.liveness_reference_url or None,
            timeout_seconds=settings.liveness_probe_timeout_seconds,
        )
        kwargs.update(overrides)
        return cls(store, **kwargs)

    def confirm(self, now: datetime) -> LivenessReport:
        try:
            machines = self.store.machines()
        except Exception as exc:  # our query failing is never evidence of anyone's death
            return LivenessReport(
                at=now, self_check="store_error", errors=[f"reading machines: {exc}"]
            )
        stale_before = rules.heartbeat_stale_before(now, self.heartbeat_seconds)
        suspects = [
            m
            for m in machines
            if m.status in ("alive", "suspect")
            and m.last_heartbeat < self._machine_stale_before(m, now)
        ]
        if not suspects:
            return LivenessReport(at=now, self_check="not_needed")
        references = self._references(machines, stale_before)
        if references and not any(self.check(url) is Reach.REACHABLE for url in references):
            return LivenessReport(
                at=now,
                self_check="reference_unreachable",
                errors=[
                    f"no known-good reference answered ({', '.join(references)}): our own "
                    "network is in doubt, no confirmation recorded this cycle"
                ],
            )
        report = LivenessReport(at=now, self_check="ok" if references else "no_reference")
        for machine in suspects:
            verdict = self._confirm_one(
                machine, now, self._machine_stale_before(machine, now), report
            )
            report.checked.append(verdict)
            if verdict.outcome == "declared_down":
                report.declared_down.append(machine.machine_id)
                report.requeued += verdict.requeued
        return report

    def _machine_stale_before(self, machine, now: datetime) -> datetime:
        seconds = self.heartbeat_by_machine.get(machine.machine_id, self.heartbeat_seconds)
        return rules.heartbeat_stale_before(now, seconds)

    def _references(self, machines, stale_before: datetime) -> list[str]:
        """Known-good targets: the configured reference, else up to three peers whose
        heartbeats are fresh (if none of them answers either, the fault is on our side)."""
        if self.reference_url is not None:
            return [self.reference_url]
        return [
            m.health_url
            for m in machines
            if m.health_url and m.status == "alive" and m.last_heartbeat >= stale_before
        ][:3]

    def _confirm_one(
        self, machine, now: datetime, stale_before: datetime, report: LivenessReport
    ) -> MachineVerdict:
        mid = machine.machine_id
        if not machine.health_url:
            return MachineVerdict(
                machine_id=mid,
                outcome="inconclusive",
                failed_confirmations=machine.failed_confirmations,
            )
        reach = self.check(machine.health_url)
        if reach is Reach.INCONCLUSIVE:
            return MachineVerdict(
                machine_id=mid,
                outcome="inconclusive",
                reach=reach,
                failed_confirmations=machine.failed_confirmations,
            )
        try:
            health = self.store.record_confirmation(
                mid, reach is Reach.UNREACHABLE, now, stale_before=stale_before
            )
            if reach is Reach.REACHABLE:
                return MachineVerdict(
                    machine_id=mid,
                    outcome="alive",
                    reach=reach,
                    failed_confirmations=health.failed_confirmations,
                )
            if health.last_heartbeat >= stale_before:
                return MachineVerdict(
                    machine_id=mid,
                    outcome="heartbeat_resumed",
                    reach=reach,
                    failed_confirmations=health.failed_confirmations,
                )
            required = self.confirmations_by_machine.get(mid, self.confirmations)
            if not rules.confirmed_down(health.failed_confirmations, required):
                return MachineVerdict(
                    machine_id=mid,
                    outcome="failed",
                    reach=reach,
                    failed_confirmations=health.failed_confirmations,
                )
            requeued = self.store.mark_down(
                mid, now, stale_before=stale_before, max_attempts=self.max_attempts
            )
        except Exception as exc:  # a failed write leaves the count as it was
            report.errors.append(f"confirming {mid}: {exc}")
            return MachineVerdict(machine_id=mid, outcome="store_error", reach=reach)
        if requeued < 0:
            return MachineVerdict(
                machine_id=mid,
                outcome="heartbeat_resumed",
                reach=reach,
                failed_confirmations=health.failed_confirmations,
            )
        return MachineVerdict(
            machine_id=mid,
            outcome="declared_down",
            reach=reach,
            failed_confirmations=health.failed_confirmations,
            requeued=requeued,
        )
