"""The mesh's immune system as pure rules: four tiers over machines, panes, task types, accounts.

Outcomes of a subject are kept in a sliding window (`window_heartbeats` × heartbeat); a
subject escalates on `soft_failures` / `hard_failures` failures in the window that are also at
least `min_failure_ratio` of its outcomes there (a task type that fails once on a flaky
machine and succeeds everywhere else is not to blame). Decay: failures leave the window as
it slides; a success releases tier 1 once the window's evidence is below the threshold.
Tiers, as DESIGN §5 and §9 give them:

- tier 0 innate: apply the corrective (respawn the pane, requeue elsewhere, back off the
  account) and resume; correctives that worked are remembered per failure signature
  (antibodies) and tried first next time, mesh-wide.
- tier 1 soft quarantine: `soft_failures` in the window → routing weight × `soft_weight`
  (−50 %) for `soft_heartbeats`; still failing at its end (new failures during it, evidence
  still above the threshold) → tier 2.
- tier 2 hard quarantine: `hard_failures` in the window → excluded for `hard_heartbeats` ×
  the ejection count (Envoy multiplies its base ejection time the same way), then one probe
  task decides: success releases, failure quarantines again, longer.
- tier 3 recalibrate: the `recalibrate_ejections`-th ejection excludes as tier 2, makes the
  subject's thresholds one step more sensitive (never below `min_failures`) and alerts.

Safety brakes (`brake`): at most `max_quarantined_share` of a kind hard-quarantined at once
(at least one when the kind has two or more members, never the only one — Envoy also ejects
one host whatever the percentage); no new quarantine while `panic_unhealthy_share` of a kind
looks unhealthy (Kubernetes stops evicting at 55 % of a zone: then it is our network).
A rate limit is not a failure: the account backs off until the reset its message names.

Everything here is a function of data and the `now` it is given; the store persists
`SubjectState` rows and the claim honours `weight` and `excluded` in SQL.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any, Literal

SubjectKind = Literal["machine", "pane", "task_type", "account"]
SUBJECT_KINDS: tuple[SubjectKind, ...] = ("machine", "pane", "task_type", "account")


class Tier(IntEnum):
    INNATE = 0
    SOFT = 1
    HARD = 2
    RECALIBRATE = 3


@dataclass(frozen=True, order=True)
class Subject:
    """What the immune system watches; written `kind:key` (e.g. `machine:mac1`, `pane:mac1/%3`)."""

    kind: SubjectKind
    key: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.key}"

    @classmethod
    def parse(cls, text: str) -> Subject:
        kind, sep, key = text.partition(":")
        if not sep or kind not in SUBJECT_KINDS or not key:
            raise ValueError(
                f"invalid subject {text!r} — write kind:key with kind one of "
                f"{', '.join(SUBJECT_KINDS)}, e.g. machine:mac1"
            )
        return cls(kind, key)

    @classmethod
    def machine(cls, machine_id: str) -> Subject:
        return cls("machine", machine_id)

    @classmethod
    def pane(cls, machine_id: str, pane_id: str) -> Subject:
        return cls("pane", f"{machine_id}/{pane_id}")

    @classmethod
    def task_type(cls, fingerprint: str) -> Subject:
        return cls("task_type", fingerprint)

    @classmethod
    def account(cls, name: str) -> Subject:
        return cls("account", name)


# Task types -----------------------------------------------------------------------
_VARIABLE = re.compile(r"[0-9]|[A-Za-z0-9]+[._-][A-Za-z0-9._-]*")


def _shape(token: str, first: bool) -> str:
    if first:
        return token.rsplit("/", 1)[-1]  # the program, wherever it is installed
    if token.startswith("-"):
        return token.split("=", 1)[0]  # flags, without their values
    words = token.split()
    if not words:
        return ""
    if words[0].startswith("/"):
        return words[0]  # a slash command names its family
    # A prompt's family: its first two words, with app ids, numbers and paths blanked.
    return " ".join("*" if _VARIABLE.search(w) else w.lower() for w in words[:2])


def task_type(kind: str, command: Iterable[str]) -> str:
    """A stable fingerprint of a task's command/prompt family: `kind:` + 10 hex digits.

    The same skill run on two apps is one family (`/meta:hydra app-a` ≡ `/meta:hydra app-b`);
    a different program, slash command, flag set or prompt opening is another.
    """
    shape = "\0".join(_shape(t, i == 0) for i, t in enumerate(command))
    return f"{kind}:{hashlib.sha1(shape.encode('utf-8')).hexdigest()[:10]}"


# Rate limits ----------------------------------------------------------------------
RATE_LIMITED = re.compile(
    r"rate[ _-]?limit|usage limit|too many requests|\b429\b|quota (?:exceeded|reached)"
    r"|limit reached|overloaded_error",
    re.IGNORECASE,
)
_EPOCH = re.compile(r"\|\s*(\d{10})\b")
_ISO = re.compile(
    r"\b(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)"
)
_AFTER = re.compile(r"retry[- ]after:?\s*(\d+)\s*(?:s|sec|seconds)?\b", re.IGNORECASE)
_IN = re.compile(
    r"\bin\s+(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hours?)\b",
    re.IGNORECASE,
)
_CLOCK = re.compile(r"\bresets?\s+(?:at\s+)?(\d{1,2})(?::(\d{2}))?\s*(am|pm)?", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def is_rate_limit(text: str | None) -> bool:
    return bool(text) and RATE_LIMITED.search(text or "") is not None


def rate_limit_reset(text: str, now: datetime) -> datetime | None:
    """The reset time a rate-limit message names (epoch after `|`, an ISO time, `retry after N`,
    `in N minutes`, `resets 3pm` — clock times are UTC), or None when it names none."""
    if m := _EPOCH.search(text):
        return datetime.fromtimestamp(int(m.group(1)), tz=UTC)
    if m := _ISO.search(text):
        try:
            at = datetime.fromisoformat(m.group(1).replace("Z", "+00:00").replace(" ", "T"))
        except ValueError:
            at = None
        if at is not None:
            return at if at.tzinfo else at.replace(tzinfo=UTC)
    if m := _AFTER.search(text):
        return now + timedelta(seconds=int(m.group(1)))
    if m := _IN.search(text):
        return now + timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)[0].lower()])
    if m := _CLOCK.search(text):
        hour, minute, half = int(m.group(1)), int(m.group(2) or 0), (m.group(3) or "").lower()
        if half == "pm" and hour < 12:
            hour += 12
        elif half == "am" and hour == 12:
            hour = 0
        if hour > 23 or minute > 59:
            return None
        at = now.astimezone(UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
        return at if at > now else at + timedelta(days=1)
    return None


# Antibodies -----------------------------------------------------------------------
_NOISY = re.compile(r"0x[0-9a-f]+|[0-9a-f]{8,}|\d+|(?:/[\w.-]+)+|'[^']*'|\"[^\"]*\"", re.IGNORECASE)

# The corrective tier 0 tries first per subject kind when no antibody says better.
INNATE_CORRECTIVE: Mapping[SubjectKind, str] = {
    "machine": "requeue_elsewhere",
    "pane": "respawn_pane",
    "task_type": "retry",
    "account": "backoff_account",
}


def failure_signature(text: str | None) -> str:
    """What kind of failure this is, without its particulars (numbers, ids, paths, quotes):
    12 hex digits, equal for two failures that differ only in those."""
    first = next((line for line in (text or "").splitlines() if line.strip()), "")
    shape = " ".join(_NOISY.sub("#", first.lower()).split())[:160]
    return hashlib.sha1(shape.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Antibody:
    """A corrective and how it fared against one failure signature, shared mesh-wide."""

    signature: str
    corrective: str
    successes: int = 0
    failures: int = 0


def learned_corrective(signature: str, antibodies: Iterable[Antibody]) -> str | None:
    """The corrective that worked best on this signature (more successes than failures), or
    None when the mesh has learned none: what a node agent applies first to a failure."""
    known = [a for a in antibodies if a.signature == signature and a.successes > a.failures]
    if not known:
        return None
    return max(
        known, key=lambda a: (a.successes - a.failures, a.successes, a.corrective)
    ).corrective


def choose_corrective(kind: SubjectKind, signature: str, antibodies: Iterable[Antibody]) -> str:
    """The learned corrective for this signature, else the innate one of the subject's kind."""
    return learned_corrective(signature, antibodies) or INNATE_CORRECTIVE[kind]


def learn(antibody: Antibody, worked: bool) -> Antibody:
    if worked:
        return replace(antibody, successes=antibody.successes + 1)
    return replace(antibody, failures=antibody.failures + 1)


# Policy and state ------------------------------------------------------------------
@dataclass(frozen=True)
class ImmunePolicy:
    heartbeat_seconds: float = 30
    window_heartbeats: int = 10
    soft_failures: int = 3
    hard_failures: int = 5
    soft_weight: float = 0.5
    soft_heartbeats: int = 5
    hard_heartbeats: int = 20
    max_exclusion_heartbeats: int = 200
    recalibrate_ejections: int = 3
    min_failures: int = 2
    min_failure_ratio: float = 0.2
    max_quarantined_share: float = 0.10
    panic_unhealthy_share: float = 0.55
    account_backoff_seconds: float = 900

    @classmethod
    def from_settings(cls, settings: Any) -> ImmunePolicy:
        return cls(
            heartbeat_seconds=settings.heartbeat_seconds,
            window_heartbeats=settings.immune_window_heartbeats,
            soft_failures=settings.immune_soft_failures,
            hard_failures=settings.immune_hard_failures,
            soft_weight=settings.immune_soft_weight,
            soft_heartbeats=settings.immune_soft_heartbeats,
            hard_heartbeats=settings.immune_hard_heartbeats,
            max_exclusion_heartbeats=settings.immune_max_exclusion_heartbeats,
            recalibrate_ejections=settings.immune_recalibrate_ejections,
            min_failures=settings.immune_min_failures,
            min_failure_ratio=settings.immune_min_failure_ratio,
            max_quarantined_share=settings.immune_max_quarantined_share,
            panic_unhealthy_share=settings.immune_panic_unhealthy_share,
            account_backoff_seconds=settings.account_backoff_seconds,
        )

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.window_heartbeats * self.heartbeat_seconds)

    def heartbeats(self, n: float) -> timedelta:
        return timedelta(seconds=n * self.heartbeat_seconds)

    def exclusion(self, ejections: int) -> timedelta:
        return self.heartbeats(
            min(self.hard_heartbeats * max(1, ejections), self.max_exclusion_heartbeats)
        )


@dataclass(frozen=True)
class SubjectState:
    """One subject's immune state, as persisted in mesh_immune_state."""

    subject: Subject
    tier: Tier = Tier.INNATE
    failures: tuple[datetime, ...] = ()  # failure times inside the window, oldest first
    successes: tuple[datetime, ...] = ()  # success times inside the window, oldest first
    ejections: int = 0  # hard quarantines so far (multiplies the exclusion)
    until: datetime | None = None  # end of the soft weight, or of the exclusion
    probe_task: str | None = None  # the one task let through after an exclusion
    backoff_until: datetime | None = None  # accounts: rate-limited until then
    sensitivity: int = 0  # tier 3 steps: thresholds lowered by this much
    reason: str = ""
    changed_at: datetime | None = None
    antibody: str = ""  # "signature/corrective" applied at tier 0, awaiting its verdict

    def soft_threshold(self, policy: ImmunePolicy) -> int:
        return max(policy.min_failures, policy.soft_failures - self.sensitivity)

    def hard_threshold(self, policy: ImmunePolicy) -> int:
        return max(self.soft_threshold(policy) + 1, policy.hard_failures - self.sensitivity)

    def failure_ratio(self) -> float:
        total = len(self.failures) + len(self.successes)
        return len(self.failures) / total if total else 0.0

    def failing(self, threshold: int, policy: ImmunePolicy) -> bool:
        """Enough failures in the window, and enough of its outcomes."""
        return len(self.failures) >= threshold and self.failure_ratio() >= policy.min_failure_ratio

    def quarantined(self, now: datetime) -> bool:
        """In tier 1 (until its end) or tier 2/3 (until the probe decides)."""
        if self.tier >= Tier.HARD:
            return True
        return self.tier == Tier.SOFT and self.until is not None and now < self.until

    def excluded(self, now: datetime) -> bool:
        """Gets no work: hard-quarantined and not yet due (or its probe is out)."""
        return self.tier >= Tier.HARD and (
            self.probe_task is not None or self.until is None or now < self.until
        )

    def probing(self, now: datetime) -> bool:
        return self.tier >= Tier.HARD and not self.excluded(now)

    def backing_off(self, now: datetime) -> bool:
        return self.backoff_until is not None and now < self.backoff_until

    def weight(self, now: datetime, policy: ImmunePolicy) -> float:
        if self.excluded(now) or self.backing_off(now):
            return 0.0
        if self.tier == Tier.SOFT and self.until is not None and now < self.until:
            return policy.soft_weight
        return 1.0


@dataclass(frozen=True)
class Observation:
    subject: Subject
    at: datetime
    outcome: Literal["success", "failure", "rate_limited"]
    reason: str = ""
    task_id: str | None = None
    # The corrective already applied to this failure (a node agent applying an antibody):
    # the subject's next outcome is that corrective's verdict.
    corrective: str = ""


@dataclass(frozen=True)
class Action:
    """What a step decided, for the caller to apply, record and announce."""

    kind: Literal[
        "corrective",
        "quarantine",
        "release",
        "probe",
        "alert",
        "backoff",
        "braked",
        "decay",
        "antibody",
    ]
    subject: Subject
    tier: Tier = Tier.INNATE
    detail: dict[str, Any] = field(default_factory=dict)


def in_window(times: Iterable[datetime], now: datetime, window: timedelta) -> tuple[datetime, ...]:
    """The times strictly inside (now − window, now], oldest first."""
    start = now - window
    return tuple(sorted(t for t in times if start < t <= now))


def looks_unhealthy(state: SubjectState, now: datetime, policy: ImmunePolicy) -> bool:
    if state.tier >= Tier.HARD:
        return True
    windowed = replace(
        state,
        failures=in_window(state.failures, now, policy.window),
        successes=in_window(state.successes, now, policy.window),
    )
    return windowed.failing(state.soft_threshold(policy), policy)


@dataclass(frozen=True)
class Brake:
    allowed: bool
    reason: str = ""


def hard_quarantine_cap(population: int, share: float) -> int:
    """How many of a kind may be hard-quarantined at once: the share, at least one when there
    are two or more, never the only one (a one-machine mesh keeps its machine)."""
    if population < 2:
        return 0
    return max(1, math.floor(population * share + 1e-9))


def brake(
    subject: Subject,
    tier: Tier,
    states: Mapping[Subject, SubjectState],
    population: int,
    now: datetime,
    policy: ImmunePolicy,
) -> Brake:
    """May `subject` go to `tier` now, given the others of its kind?"""
    peers = [s for s in states.values() if s.subject.kind == subject.kind]
    population = max(population, len(peers), 1)
    unhealthy = sum(1 for s in peers if looks_unhealthy(s, now, policy))
    if unhealthy / population >= policy.panic_unhealthy_share:
        return Brake(
            False,
            f"{unhealthy} of {population} {subject.kind}s look unhealthy "
            f"(≥ {policy.panic_unhealthy_share:.0%}): likely our own network; "
            "not quarantining",
        )
    if tier >= Tier.HARD:
        cap = hard_quarantine_cap(population, policy.max_quarantined_share)
        held = sum(1 for s in peers if s.tier >= Tier.HARD and s.subject != subject)
        if held >= cap:
            return Brake(
                False,
                f"{held} of {population} {subject.kind}s already hard-quarantined "
                f"(cap {cap}, {policy.max_quarantined_share:.0%})",
            )
    return Brake(True)


# Steps -------------------------------------------------------------------------------
def _eject(
    state: SubjectState, at: datetime, policy: ImmunePolicy, why: str
) -> tuple[SubjectState, list[Action]]:
    ejections = state.ejections + 1
    recalibrate = ejections >= policy.recalibrate_ejections
    tier = Tier.RECALIBRATE if recalibrate else Tier.HARD
    sensitivity = state.sensitivity
    actions = []
    if recalibrate:
        # One step more sensitive per tier-3 ejection, within the bound min_failures.
        floor_step = max(0, policy.soft_failures - policy.min_failures)
        sensitivity = min(sensitivity + 1, floor_step)
    until = at + policy.exclusion(ejections)
    new = replace(
        state,
        tier=tier,
        ejections=ejections,
        until=until,
        probe_task=None,
        sensitivity=sensitivity,
        reason=why,
        changed_at=at,
    )
    actions.append(
        Action(
            "quarantine",
            state.subject,
            tier,
            {"until": until.isoformat(), "ejections": ejections, "reason": why},
        )
    )
    if recalibrate:
        actions.append(
            Action(
                "alert",
                state.subject,
                tier,
                {
                    "reason": f"{state.subject} ejected {ejections} times: {why}",
                    "soft_failures": new.soft_threshold(policy),
                    "hard_failures": new.hard_threshold(policy),
                },
            )
        )
    return new, actions


def observe(
    state: SubjectState,
    obs: Observation,
    policy: ImmunePolicy,
    brake_for: Any = None,
    antibodies: Iterable[Antibody] = (),
) -> tuple[SubjectState, list[Action]]:
    """One observation of `state.subject` (time passes to it first). `brake_for(tier) -> Brake`
    (None: always allowed) is asked before any new quarantine.

    Antibodies: a tier-0 failure names the corrective (the best known for its signature) and
    remembers it; the subject's next success says it worked, the same failure again says it
    did not — an "antibody" action carries the verdict for the store (`record_antibody`)."""
    state, passed = tick(state, obs.at, policy, brake_for)
    verdict: list[Action] = []
    if state.antibody and obs.outcome in ("success", "failure"):
        signature, _, corrective = state.antibody.partition("/")
        if obs.outcome == "success" or failure_signature(obs.reason) == signature:
            worked = obs.outcome == "success"
            verdict.append(
                Action(
                    "antibody",
                    state.subject,
                    state.tier,
                    {"signature": signature, "corrective": corrective, "worked": worked},
                )
            )
            state = replace(state, antibody="")
    state, decided = _observe(state, obs, policy, brake_for)
    if any(a.kind == "corrective" for a in decided):
        signature = failure_signature(obs.reason)
        corrective = obs.corrective or choose_corrective(state.subject.kind, signature, antibodies)
        state = replace(state, antibody=f"{signature}/{corrective}")
        decided = [
            replace(a, detail={**a.detail, "signature": signature, "corrective": corrective})
            if a.kind == "corrective"
            else a
            for a in decided
        ]
    return state, passed + verdict + decided


def _observe(
    state: SubjectState, obs: Observation, policy: ImmunePolicy, brake_for: Any
) -> tuple[SubjectState, list[Action]]:
    at = obs.at
    if obs.outcome == "rate_limited":
        # Not a failure: the account waits for its reset, the task is not charged.
        reset = rate_limit_reset(obs.reason, at) or at + timedelta(
            seconds=policy.account_backoff_seconds
        )
        until = max(reset, state.backoff_until or reset)
        return (
            replace(state, backoff_until=until, changed_at=at),
            [Action("backoff", state.subject, state.tier, {"until": until.isoformat()})],
        )
    if obs.outcome == "success":
        if state.probing(at) or (
            state.tier >= Tier.HARD and obs.task_id is not None and obs.task_id == state.probe_task
        ):
            return (
                replace(
                    state,
                    tier=Tier.INNATE,
                    failures=(),
                    successes=(at,),
                    until=None,
                    probe_task=None,
                    reason="probe succeeded",
                    changed_at=at,
                ),
                [Action("release", state.subject, Tier.INNATE, {"reason": "probe succeeded"})],
            )
        state = replace(state, successes=in_window((*state.successes, at), at, policy.window))
        if state.tier == Tier.SOFT and not state.failing(state.soft_threshold(policy), policy):
            return (
                replace(state, tier=Tier.INNATE, until=None, reason="recovered", changed_at=at),
                [Action("release", state.subject, Tier.INNATE, {"reason": "recovered"})],
            )
        return state, []

    failures = in_window((*state.failures, at), at, policy.window)
    state = replace(state, failures=failures)
    why = obs.reason[:200] or "failure"
    if state.tier >= Tier.HARD:
        if state.probing(at) or (obs.task_id is not None and obs.task_id == state.probe_task):
            return _eject(state, at, policy, f"probe failed: {why}")
        return state, []  # excluded already: its late failures only fill the window

    def allowed(tier: Tier) -> Brake:
        return brake_for(tier) if brake_for is not None else Brake(True)

    braked: list[Action] = []
    if state.failing(state.hard_threshold(policy), policy):
        b = allowed(Tier.HARD)
        if b.allowed:
            return _eject(state, at, policy, why)
        braked.append(Action("braked", state.subject, Tier.HARD, {"reason": b.reason}))
    if state.failing(state.soft_threshold(policy), policy) and state.tier < Tier.SOFT:
        b = allowed(Tier.SOFT)
        if b.allowed:
            until = at + policy.heartbeats(policy.soft_heartbeats)
            return (
                replace(state, tier=Tier.SOFT, until=until, reason=why, changed_at=at),
                braked
                + [
                    Action(
                        "quarantine",
                        state.subject,
                        Tier.SOFT,
                        {"until": until.isoformat(), "weight": policy.soft_weight, "reason": why},
                    )
                ],
            )
        braked.append(Action("braked", state.subject, Tier.SOFT, {"reason": b.reason}))
    return state, braked + [Action("corrective", state.subject, Tier.INNATE, {"reason": why})]


def tick(
    state: SubjectState, now: datetime, policy: ImmunePolicy, brake_for: Any = None
) -> tuple[SubjectState, list[Action]]:
    """Time passing: the window slides, tier 1 runs out (or escalates to tier 2 if the subject
    kept failing under it), an account's backoff ends, and a clean period forgives one ejection."""
    actions: list[Action] = []
    failures = in_window(state.failures, now, policy.window)
    successes = in_window(state.successes, now, policy.window)
    new = state
    if failures != state.failures or successes != state.successes:
        new = replace(state, failures=failures, successes=successes)
    if new.tier == Tier.SOFT and new.until is not None and now >= new.until:
        began = new.until - policy.heartbeats(policy.soft_heartbeats)
        if any(t > began for t in failures) and new.failing(new.soft_threshold(policy), policy):
            brake_result = brake_for(Tier.HARD) if brake_for is not None else Brake(True)
            if brake_result.allowed:
                return _eject(new, new.until, policy, "still failing under soft quarantine")
            actions.append(
                Action("braked", new.subject, Tier.HARD, {"reason": brake_result.reason})
            )
        new = replace(
            new, tier=Tier.INNATE, until=None, reason="soft quarantine over", changed_at=now
        )
        actions.append(
            Action("decay", new.subject, Tier.INNATE, {"reason": "soft quarantine over"})
        )
    if new.backoff_until is not None and now >= new.backoff_until:
        new = replace(new, backoff_until=None)
    if (
        new.tier == Tier.INNATE
        and new.ejections > 0
        and not failures
        and new.changed_at is not None
        and now - new.changed_at >= policy.exclusion(new.ejections)
    ):
        new = replace(new, ejections=new.ejections - 1, changed_at=now)
    return new, actions


def probe_claimed(state: SubjectState, task_id: str) -> SubjectState:
    return replace(state, probe_task=task_id)
