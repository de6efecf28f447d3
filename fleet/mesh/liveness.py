"""Truthful liveness: a machine is declared down only on repeated evidence, never on our own errors.

One confirmation = the machine's heartbeat is missed (older than `liveness_missed_heartbeats`
periods, 1.5) AND its health endpoint fails a reachability check. After `liveness_confirmations`
consecutive failed confirmations it is marked down and its active claims are requeued. One round
takes them all, `liveness_confirm_spacing_seconds` apart (re-reading the heartbeat and re-checking
our own network before each), so a machine dead right after a heartbeat is down 1.5 periods + the
watchdog's interval + the spacing later, not a watchdog interval per confirmation. What is NOT
evidence:

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
import hashlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from enum import Enum

import httpx
from pydantic import BaseModel

from fleet.clock import Clock, SystemClock
from fleet.mesh import rules
from fleet.mesh.store import MachineHealth, MeshStore

log = logging.getLogger(__name__)


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


def normal_fingerprint(text: str) -> str:
    """A SHA-256 certificate fingerprint as 64 lower-case hex digits (colons and spaces, as
    `openssl x509 -fingerprint -sha256` prints them, are dropped); ValueError otherwise."""
    hexed = text.replace(":", "").replace(" ", "").strip().lower()
    if len(hexed) != 64 or any(c not in "0123456789abcdef" for c in hexed):
        raise ValueError(
            f"pinned certificate fingerprint {text!r} is not a SHA-256 fingerprint (64 hex "
            "digits, colons allowed) — see `openssl x509 -noout -fingerprint -sha256 -in cert`"
        )
    return hexed


class PinMismatch(Exception):
    """The https peer showed a certificate other than the one pinned for it."""


class ReachabilityCheck:
    """GET a health URL with a short timeout and say what the outcome is evidence of.

    With `pin` (a WAN peer's https endpoint): trust comes from the pinned SHA-256 fingerprint
    of its certificate, not from a CA — a self-signed certificate is fine — and any other
    certificate is refused: the machine we pinned did not answer (UNREACHABLE), and an
    impostor at its address never vouches for it."""

    def __init__(self, timeout_seconds: float = 2.0, client: httpx.Client | None = None):
        self._client = client or httpx.Client(
            timeout=timeout_seconds, follow_redirects=False, trust_env=False
        )
        self._timeout = timeout_seconds
        self._pinned: httpx.Client | None = None

    def __call__(self, url: str, pin: str | None = None) -> Reach:
        try:
            if pin is None:
                self._client.get(url)
            else:
                self._get_pinned(url, normal_fingerprint(pin))
        except PinMismatch as exc:
            log.warning("liveness: %s", exc)
            return Reach.UNREACHABLE
        except Exception as exc:  # every failure is classified, none escapes as a verdict
            return classify_error(exc)
        return Reach.REACHABLE

    def _get_pinned(self, url: str, pin: str) -> None:
        if not url.startswith("https://"):
            raise PinMismatch(f"{url} has a pinned certificate but is not an https URL")
        if self._pinned is None:
            context = ssl.create_default_context()
            context.check_hostname = False  # the pin, checked below, is the trust
            context.verify_mode = ssl.CERT_NONE
            self._pinned = httpx.Client(
                timeout=self._timeout, follow_redirects=False, trust_env=False, verify=context
            )
        with self._pinned.stream("GET", url) as response:
            tls = response.extensions["network_stream"].get_extra_info("ssl_object")
            der = tls.getpeercert(True) if tls is not None else None
            seen = hashlib.sha256(der).hexdigest() if der else "none"
            if seen != pin:
                raise PinMismatch(
                    f"{url} showed certificate sha256 {seen}, not its pinned {pin}: refused"
                )

    def close(self) -> None:
        self._client.close()
        if self._pinned is not None:
            self._pinned.close()


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
        missed_heartbeats: float = rules.MISSED_HEARTBEATS,
        confirm_spacing_seconds: float = 0.0,
        clock: Clock | None = None,
        pinned_certs: Mapping[str, str] | None = None,
        heartbeat_by_machine: Mapping[str, float] | None = None,
        confirmations_by_machine: Mapping[str, int] | None = None,
    ):
        self.store = store
        self.heartbeat_seconds = heartbeat_seconds
        self.missed_heartbeats = missed_heartbeats
        self.confirmations = confirmations
        self.confirm_spacing_seconds = confirm_spacing_seconds
        self.clock: Clock = clock or SystemClock()
        # machine id → SHA-256 fingerprint its https health endpoint must show (WAN peers)
        self.pinned_certs = {m: normal_fingerprint(f) for m, f in (pinned_certs or {}).items()}
        # Machines on a canary policy of their own (fleet.tuning.policies.PoliciesInForce).
        self.heartbeat_by_machine = dict(heartbeat_by_machine or {})
        self.confirmations_by_machine = dict(confirmations_by_machine or {})
        self.max_attempts = max_attempts
        self.reference_url = reference_url or None
        self._owned: ReachabilityCheck | None = None
        if check is None:
            self._owned = check = ReachabilityCheck(timeout_seconds)
        self.check: Callable[..., Reach] = check

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
            missed_heartbeats=settings.liveness_missed_heartbeats,
            confirm_spacing_seconds=settings.liveness_confirm_spacing_seconds,
            pinned_certs=settings.liveness_pinned_certs,
        )
        kwargs.update(overrides)
        return cls(store, **kwargs)

    def _reach(self, machine: MachineHealth) -> Reach:
        """Check a machine's health URL, against its pinned certificate when it has one."""
        pin = self.pinned_certs.get(machine.machine_id)
        url = machine.health_url or ""
        return self.check(url) if pin is None else self.check(url, pin)

    def _stale_before(self, now: datetime) -> datetime:
        return rules.heartbeat_stale_before(now, self.heartbeat_seconds, self.missed_heartbeats)

    def confirm(self, now: datetime) -> LivenessReport:
        """One round: up to `confirmations` passes over the suspects, `confirm_spacing_seconds`
        apart; a pass goes on only with the machines whose failure counted but is not yet enough.
        `checked` holds each machine's last verdict."""
        try:
            machines = self.store.machines()
        except Exception as exc:  # our query failing is never evidence of anyone's death
            return LivenessReport(
                at=now, self_check="store_error", errors=[f"reading machines: {exc}"]
            )
        stale_before = self._stale_before(now)
        suspects = [
            m
            for m in machines
            if m.status in ("alive", "suspect")
            and m.last_heartbeat < self._machine_stale_before(m, now)
        ]
        if not suspects:
            return LivenessReport(at=now, self_check="not_needed")
        references = self._references(machines, stale_before)
        report = LivenessReport(at=now, self_check="ok" if references else "no_reference")
        verdicts: dict[str, MachineVerdict] = {}
        required = max([self.confirmations, *self.confirmations_by_machine.values()])
        passes = rules.confirmation_passes(required, self.confirm_spacing_seconds)
        for n in range(passes):
            if n:
                self.clock.sleep(self.confirm_spacing_seconds)
            at = now + timedelta(seconds=n * self.confirm_spacing_seconds)
            # Our own network is checked again before each pass (same known-good targets).
            if references and not any(self._answers(ref) for ref in references):
                shown = ", ".join(
                    r if isinstance(r, str) else str(r.health_url) for r in references
                )
                report.self_check = "reference_unreachable"
                report.errors.append(
                    f"no known-good reference answered ({shown}): our own "
                    "network is in doubt, no confirmation recorded this cycle"
                )
                break
            for machine in suspects:
                verdict = self._confirm_one(
                    machine, at, self._machine_stale_before(machine, at), report
                )
                verdicts[machine.machine_id] = verdict
                if verdict.failed_confirmations is not None:
                    machine.failed_confirmations = verdict.failed_confirmations
            suspects = [m for m in suspects if verdicts[m.machine_id].outcome == "failed"]
            if not suspects:
                break
        for verdict in verdicts.values():
            report.checked.append(verdict)
            if verdict.outcome == "declared_down":
                report.declared_down.append(verdict.machine_id)
                report.requeued += verdict.requeued
        return report

    def _machine_stale_before(self, machine, now: datetime) -> datetime:
        seconds = self.heartbeat_by_machine.get(machine.machine_id, self.heartbeat_seconds)
        return rules.heartbeat_stale_before(now, seconds, self.missed_heartbeats)

    def _references(self, machines, stale_before: datetime) -> list[str | MachineHealth]:
        """Known-good targets: the configured reference URL, else up to three peers whose
        heartbeats are fresh (if none of them answers either, the fault is on our side)."""
        if self.reference_url is not None:
            return [self.reference_url]
        return [
            m
            for m in machines
            if m.health_url and m.status == "alive" and m.last_heartbeat >= stale_before
        ][:3]

    def _answers(self, reference: str | MachineHealth) -> bool:
        reach = self.check(reference) if isinstance(reference, str) else self._reach(reference)
        return reach is Reach.REACHABLE

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
        reach = self._reach(machine)
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
