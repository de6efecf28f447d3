"""The immune system's pure rules: tiers, decay, probes, brakes, rate limits, antibodies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fleet.clock import ManualClock
from fleet.mesh import immune
from fleet.mesh.immune import (
    Antibody,
    Brake,
    ImmunePolicy,
    Observation,
    Subject,
    SubjectState,
    Tier,
)
from fleet.settings import FleetSettings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
P = ImmunePolicy()  # heartbeat 30 s, window 10 heartbeats, soft 3, hard 5
MAC = Subject.machine("mac1")


def fail(
    state: SubjectState, at: datetime, reason: str = "boom", **kw
) -> tuple[SubjectState, list]:
    return immune.observe(state, Observation(state.subject, at, "failure", reason, **kw), P)


def ok(state: SubjectState, at: datetime, **kw) -> tuple[SubjectState, list]:
    return immune.observe(state, Observation(state.subject, at, "success", **kw), P)


def kinds(actions) -> list[str]:
    return [a.kind for a in actions]


def test_policy_reads_every_threshold_from_the_settings():
    s = FleetSettings(immune_soft_failures=4, immune_hard_heartbeats=7, heartbeat_seconds=10)
    p = ImmunePolicy.from_settings(s)
    assert (p.soft_failures, p.hard_heartbeats, p.heartbeat_seconds) == (4, 7, 10)
    assert p.exclusion(2) == timedelta(seconds=140)


def test_tier_0_applies_the_corrective_and_resumes():
    state, actions = fail(SubjectState(MAC), T0)
    assert state.tier == Tier.INNATE and kinds(actions) == ["corrective"]
    assert state.weight(T0, P) == 1.0


def test_tier_1_halves_the_weight_for_five_heartbeats_then_decays():
    clock = ManualClock(T0)
    state = SubjectState(MAC)
    for _ in range(3):
        state, actions = fail(state, clock.advance(10))
    assert state.tier == Tier.SOFT and "quarantine" in kinds(actions)
    assert state.weight(clock.now(), P) == 0.5
    assert state.until == clock.now() + timedelta(seconds=5 * 30)
    state, actions = immune.tick(state, clock.advance(5 * 30), P)
    assert state.tier == Tier.INNATE and kinds(actions) == ["decay"]
    assert state.weight(clock.now(), P) == 1.0


def test_successes_dilute_the_evidence_and_release_a_soft_quarantine():
    clock = ManualClock(T0)
    state = SubjectState(MAC)
    for _ in range(3):
        state, _ = fail(state, clock.advance(5))
    for _ in range(12):  # 3 of 15 outcomes failed: still 20 %
        state, actions = ok(state, clock.advance(1))
    assert state.tier == Tier.SOFT and actions == []
    state, actions = ok(state, clock.advance(1))
    assert state.tier == Tier.INNATE and kinds(actions) == ["release"]
    assert len(state.failures) == 3  # they leave as the window slides


def test_failures_that_are_a_small_share_of_outcomes_do_not_escalate():
    tt = SubjectState(Subject.task_type("skill:ab"))
    for i in range(50):
        tt, _ = ok(tt, T0 + timedelta(seconds=i))
    for i in range(5):  # a flaky machine's five failures among everyone's successes
        tt, actions = fail(tt, T0 + timedelta(seconds=60 + i))
    assert tt.tier == Tier.INNATE and kinds(actions)[-1] == "corrective"
    assert "quarantine" not in kinds(actions)


def test_still_failing_at_the_end_of_a_soft_quarantine_escalates_to_hard():
    clock = ManualClock(T0)
    state = SubjectState(MAC)
    for _ in range(3):
        state, _ = fail(state, clock.advance(5))
    assert state.tier == Tier.SOFT
    state, _ = fail(state, clock.advance(60))  # failing again under the reduced weight
    state, actions = immune.tick(state, state.until, P)
    assert state.tier == Tier.HARD and kinds(actions) == ["quarantine"]
    assert actions[0].detail["reason"] == "still failing under soft quarantine"


def test_tier_2_excludes_for_twenty_heartbeats_then_one_probe_decides():
    clock = ManualClock(T0)
    state = SubjectState(MAC)
    for _ in range(5):
        state, actions = fail(state, clock.advance(5))
    assert state.tier == Tier.HARD and state.ejections == 1
    assert state.excluded(clock.now()) and state.weight(clock.now(), P) == 0.0
    assert state.until == clock.now() + timedelta(seconds=20 * 30)
    clock.advance(20 * 30)
    assert state.probing(clock.now()) and not state.excluded(clock.now())
    state = immune.probe_claimed(state, "probe-1")
    assert state.excluded(clock.now())  # one probe at a time
    state, actions = ok(state, clock.advance(5), task_id="probe-1")
    assert state.tier == Tier.INNATE and kinds(actions) == ["release"]


def test_a_failed_probe_quarantines_again_for_longer():
    clock = ManualClock(T0)
    state = SubjectState(MAC)
    for _ in range(5):
        state, _ = fail(state, clock.advance(5))
    clock.advance(20 * 30)
    state = immune.probe_claimed(state, "probe-1")
    state, actions = fail(state, clock.advance(5), task_id="probe-1")
    assert state.tier == Tier.HARD and state.ejections == 2
    assert state.until == clock.now() + timedelta(seconds=2 * 20 * 30)
    assert kinds(actions) == ["quarantine"]


def test_the_third_ejection_recalibrates_and_alerts():
    clock = ManualClock(T0)
    state = SubjectState(MAC, tier=Tier.HARD, ejections=2, until=T0, probe_task="p")
    state, actions = fail(state, clock.advance(5), task_id="p")
    assert state.tier == Tier.RECALIBRATE and kinds(actions) == ["quarantine", "alert"]
    assert state.soft_threshold(P) == 2 and state.hard_threshold(P) == 4
    alert = actions[1]
    assert alert.detail["soft_failures"] == 2
    # Bounded: more recalibrations never go below min_failures.
    for _ in range(5):
        state = immune.probe_claimed(immune.replace(state, until=clock.now()), "q")
        state, _ = fail(state, clock.advance(5), task_id="q")
    assert state.soft_threshold(P) == P.min_failures


def test_exclusion_is_capped():
    assert P.exclusion(1000) == timedelta(seconds=P.max_exclusion_heartbeats * 30)


def test_a_clean_period_forgives_one_ejection():
    state = SubjectState(MAC, ejections=2, changed_at=T0)
    state, _ = immune.tick(state, T0 + P.exclusion(2), P)
    assert state.ejections == 1


def test_rate_limit_is_not_a_failure_and_backs_the_account_off_until_its_reset():
    acct = SubjectState(Subject.account("claude-a"))
    msg = "Claude usage limit reached. Your limit resets 3pm"
    state, actions = immune.observe(acct, Observation(acct.subject, T0, "rate_limited", msg), P)
    assert state.failures == () and state.tier == Tier.INNATE
    assert state.backoff_until == T0.replace(hour=15)
    assert state.weight(T0, P) == 0.0 and kinds(actions) == ["backoff"]
    state, _ = immune.tick(state, T0.replace(hour=15), P)
    assert state.backoff_until is None


def test_rate_limit_messages_and_their_reset_times():
    now = T0
    assert immune.is_rate_limit("Error: 429 Too Many Requests")
    assert immune.is_rate_limit("Claude AI usage limit reached|1772370000")
    assert not immune.is_rate_limit("AssertionError: 2 != 3")
    assert immune.rate_limit_reset("usage limit reached|1772370000", now) == datetime.fromtimestamp(
        1772370000, tz=UTC
    )
    assert immune.rate_limit_reset("rate limited, try again in 5 minutes", now) == now + timedelta(
        minutes=5
    )
    assert immune.rate_limit_reset("429; Retry-After: 30", now) == now + timedelta(seconds=30)
    assert immune.rate_limit_reset("resets at 11am", now) == now.replace(hour=11) + timedelta(
        days=1
    )
    assert immune.rate_limit_reset("limit resets 2026-03-01T13:00:00Z", now) == now.replace(hour=13)
    assert immune.rate_limit_reset("rate limit exceeded", now) is None


def test_an_unparsed_rate_limit_backs_off_for_the_configured_time():
    acct = SubjectState(Subject.account("k"))
    state, _ = immune.observe(acct, Observation(acct.subject, T0, "rate_limited", "429"), P)
    assert state.backoff_until == T0 + timedelta(seconds=P.account_backoff_seconds)


def test_task_types_fingerprint_the_command_family_not_the_app():
    a = immune.task_type("hydra", ["claude", "-p", "/meta:hydra demo-calc"])
    b = immune.task_type("hydra", ["/usr/local/bin/claude", "-p", "/meta:hydra app-2"])
    c = immune.task_type("hydra", ["codex", "-p", "/meta:hydra demo-calc"])
    d = immune.task_type("skill", ["claude", "-p", "Evolve demo-calc now"])
    e = immune.task_type("skill", ["claude", "-p", "Evolve notes.app now"])
    assert a == b and a != c and d == e and a.startswith("hydra:")


def test_failure_signatures_ignore_particulars():
    s1 = immune.failure_signature("FileNotFoundError: /tmp/a/b.txt at line 42")
    s2 = immune.failure_signature("FileNotFoundError: /var/x.py at line 7\nmore")
    s3 = immune.failure_signature("PermissionError: /tmp/a")
    assert s1 == s2 and s1 != s3


def test_antibodies_pick_the_corrective_that_worked():
    sig = immune.failure_signature("pane exited")
    assert immune.choose_corrective("pane", sig, []) == "respawn_pane"
    bodies = [
        Antibody(sig, "respawn_pane", 1, 3),
        Antibody(sig, "requeue_elsewhere", 4, 0),
        Antibody("other", "retry", 9, 0),
    ]
    assert immune.choose_corrective("pane", sig, bodies) == "requeue_elsewhere"
    assert immune.learn(bodies[0], True).successes == 2
    # What a node agent applies first: only a learned corrective, never the innate default.
    assert immune.learned_corrective(sig, bodies) == "requeue_elsewhere"
    assert immune.learned_corrective(sig, bodies[:1]) is None  # it failed more than it worked
    assert immune.learned_corrective("unknown", bodies) is None


def test_an_applied_corrective_is_the_one_its_verdict_credits():
    sig = immune.failure_signature("disk full")
    state = SubjectState(Subject.machine("m1"))
    failed = immune.Observation(
        Subject.machine("m1"), T0, "failure", "disk full", "t1", corrective="retry"
    )
    state, actions = immune.observe(state, failed, P, antibodies=[Antibody(sig, "other", 5, 0)])
    assert state.antibody == f"{sig}/retry"
    ok = immune.Observation(Subject.machine("m1"), T0 + timedelta(seconds=1), "success")
    state, actions = immune.observe(state, ok, P)
    [verdict] = [a for a in actions if a.kind == "antibody"]
    assert verdict.detail == {"signature": sig, "corrective": "retry", "worked": True}


def test_subjects_parse_and_print():
    assert str(Subject.pane("mac1", "%3")) == "pane:mac1/%3"
    assert Subject.parse("task_type:skill:ab12") == Subject("task_type", "skill:ab12")
    for bad in ("mac1", "planet:x", "machine:"):
        try:
            Subject.parse(bad)
        except ValueError as exc:
            assert "kind:key" in str(exc)
        else:
            raise AssertionError(bad)


# Safety brakes -------------------------------------------------------------------------
def _hard(name: str) -> SubjectState:
    return SubjectState(
        Subject.machine(name), tier=Tier.HARD, ejections=1, until=T0 + timedelta(hours=1)
    )


def _flaky(name: str) -> SubjectState:
    return SubjectState(Subject.machine(name), failures=(T0, T0, T0))


def test_hard_quarantine_cap_is_a_share_but_at_least_one_and_never_the_only_one():
    assert immune.hard_quarantine_cap(1, 0.10) == 0
    assert immune.hard_quarantine_cap(2, 0.10) == 1
    assert immune.hard_quarantine_cap(9, 0.10) == 1
    assert immune.hard_quarantine_cap(30, 0.10) == 3


def test_brake_refuses_a_second_hard_quarantine_in_a_small_mesh():
    states = {s.subject: s for s in [_hard("a"), SubjectState(Subject.machine("b"))]}
    states.update({Subject.machine(n): SubjectState(Subject.machine(n)) for n in "cdefgh"})
    b = immune.brake(Subject.machine("b"), Tier.HARD, states, 8, T0, P)
    assert not b.allowed and "cap 1" in b.reason
    assert immune.brake(Subject.machine("b"), Tier.SOFT, states, 8, T0, P).allowed


def test_brake_stops_quarantining_when_most_of_the_mesh_looks_unhealthy():
    states = {
        s.subject: s
        for s in [
            _flaky("a"),
            _flaky("b"),
            _flaky("c"),
            SubjectState(Subject.machine("d")),
            SubjectState(Subject.machine("e")),
        ]
    }
    b = immune.brake(Subject.machine("a"), Tier.SOFT, states, 5, T0, P)
    assert not b.allowed and "our own network" in b.reason


def test_a_braked_escalation_stays_at_tier_0_and_says_why():
    state = SubjectState(MAC)
    refuse = lambda tier: Brake(False, "cap reached")  # noqa: E731
    for i in range(5):
        state, actions = immune.observe(
            state, Observation(MAC, T0 + timedelta(seconds=i), "failure", "x"), P, refuse
        )
    assert state.tier == Tier.INNATE
    assert [k for k in kinds(actions) if k != "antibody"] == ["braked", "braked", "corrective"]


# Window maths (hypothesis) -----------------------------------------------------------------
offsets = st.lists(st.integers(min_value=-3600, max_value=3600), max_size=40)


@hsettings(max_examples=200, deadline=None)
@given(offsets, st.integers(min_value=1, max_value=1200))
def test_window_keeps_exactly_the_times_inside_it(secs, window_seconds):
    window = timedelta(seconds=window_seconds)
    times = [T0 + timedelta(seconds=s) for s in secs]
    kept = immune.in_window(times, T0, window)
    assert list(kept) == sorted(kept)
    assert len(kept) == sum(1 for t in times if T0 - window < t <= T0)
    assert immune.in_window(kept, T0, window) == kept  # idempotent
    later = immune.in_window(kept, T0 + timedelta(seconds=1), window)
    assert set(later) <= set(kept)  # sliding only drops


@hsettings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["failure", "success"]), max_size=60),
    st.lists(st.integers(min_value=1, max_value=120), min_size=60, max_size=60),
)
def test_any_outcome_sequence_keeps_the_state_consistent(outcomes, gaps):
    state, now = SubjectState(MAC), T0
    for outcome, gap in zip(outcomes, gaps, strict=False):
        now += timedelta(seconds=gap)
        state, _ = immune.observe(state, Observation(MAC, now, outcome, "x"), P)  # type: ignore[arg-type]
        assert len(state.failures) <= P.window_heartbeats * P.heartbeat_seconds
        assert all(now - P.window < t <= now for t in state.failures)
        assert 0.0 <= state.weight(now, P) <= 1.0
        if state.tier >= Tier.HARD:
            assert state.ejections >= 1 and state.until is not None
            assert state.until - now <= P.exclusion(state.ejections)
        assert state.soft_threshold(P) >= P.min_failures


def test_a_tier_0_corrective_is_judged_by_what_follows_and_learned():
    pane = SubjectState(Subject.pane("mac1", "%1"))
    pane, actions = immune.observe(
        pane, Observation(pane.subject, T0, "failure", "agent exited 3"), P
    )
    [corrective] = actions
    sig = immune.failure_signature("agent exited 3")
    assert (
        corrective.detail["corrective"] == "respawn_pane" and corrective.detail["signature"] == sig
    )
    pane, actions = immune.observe(
        pane, Observation(pane.subject, T0 + timedelta(seconds=5), "success"), P
    )
    assert [(a.kind, a.detail["worked"]) for a in actions] == [("antibody", True)]
    assert pane.antibody == ""
    # What worked is tried first next time (here a remembered reroute beats the innate respawn).
    bodies = [Antibody(sig, "requeue_elsewhere", 3, 0)]
    pane, actions = immune.observe(
        pane,
        Observation(pane.subject, T0 + timedelta(seconds=9), "failure", "agent exited 7"),
        P,
        None,
        bodies,
    )
    assert actions[-1].detail["corrective"] == "requeue_elsewhere"
    pane, actions = immune.observe(
        pane,
        Observation(pane.subject, T0 + timedelta(seconds=12), "failure", "agent exited 9"),
        P,
        None,
        bodies,
    )
    assert ("antibody", False) in [(a.kind, a.detail.get("worked")) for a in actions]
