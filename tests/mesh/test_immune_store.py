"""Contract tests on both mesh backends: claims honour quarantines and mesh identity; immune
state, antibodies, events, cursors and breaker rows persist."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleet.clock import ManualClock
from fleet.mesh.immune import Action, ImmunePolicy, Subject, SubjectState, Tier, task_type
from fleet.mesh.immune_store import ImmuneStore
from fleet.mesh.store import MachineIdentity, TaskStatus

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
P = ImmunePolicy()


@pytest.fixture
def store(any_store):
    return any_store


def join(
    store, machine_id: str, now: datetime, mesh_id: str = "mesh-a", generation: int = 1
) -> None:
    store.heartbeat(
        MachineIdentity(machine_id=machine_id, mesh_id=mesh_id, generation=generation),
        now,
        None,
        [],
    )


def fill(
    store,
    n: int,
    now: datetime,
    prefix: str = "t",
    kind: str = "skill",
    command: list[str] | None = None,
    **kw,
) -> None:
    for i in range(n):
        store.enqueue(
            kind,
            command or ["claude", "-p", f"evolve app-{i}"],
            now + timedelta(microseconds=i),
            task_id=f"{prefix}{i:03d}",
            **kw,
        )


def quarantine(store, state: SubjectState, now: datetime) -> None:
    store.save_immune([state], [Action("quarantine", state.subject, state.tier)], P, now)


def test_both_backends_are_immune_stores(store):
    assert isinstance(store, ImmuneStore)


def test_a_machine_that_never_registered_cannot_claim(store):
    fill(store, 1, T0)
    assert store.claim("stranger", T0) == []
    join(store, "stranger", T0)
    assert [t.task_id for t in store.claim("stranger", T0)] == ["t000"]


def test_a_machine_claims_only_its_own_meshs_tasks(store):
    join(store, "a1", T0, mesh_id="mesh-a")
    join(store, "b1", T0, mesh_id="mesh-b")
    join(store, "old", T0, mesh_id="mesh-a", generation=0)
    store.enqueue("skill", ["x"], T0, task_id="for-a", mesh_id="mesh-a")
    store.enqueue("skill", ["x"], T0 + timedelta(seconds=1), task_id="anyone")
    task = store.get_task("for-a")
    assert (task.mesh_id, task.generation) == ("mesh-a", 1)
    assert [t.task_id for t in store.claim("old", T0, limit=5)] == ["anyone"]  # other generation
    assert store.claim("b1", T0, limit=5) == []
    assert [t.task_id for t in store.claim("a1", T0, limit=5)] == ["for-a"]


def test_queue_rows_carry_their_task_type(store):
    store.enqueue("hydra", ["claude", "-p", "/meta:hydra demo-calc"], T0, task_id="h")
    assert store.get_task("h").task_type == task_type("hydra", ["claude", "-p", "/meta:hydra x"])


def test_a_hard_quarantined_machine_gets_nothing_then_exactly_one_probe(store):
    clock = ManualClock(T0)
    join(store, "flaky", clock.now())
    fill(store, 5, clock.now())
    until = clock.now() + timedelta(minutes=10)
    quarantine(
        store,
        SubjectState(Subject.machine("flaky"), tier=Tier.HARD, ejections=1, until=until),
        clock.now(),
    )
    assert store.claim("flaky", clock.now(), limit=3) == []
    clock.advance(600)
    [probe] = store.claim("flaky", clock.now(), limit=3)
    [state] = store.immune_states("machine")
    assert state.probe_task == probe.task_id and state.excluded(clock.now())
    assert store.claim("flaky", clock.advance(15), limit=3) == []  # the probe decides first


def test_a_soft_quarantined_machine_claims_at_half_weight(store):
    clock = ManualClock(T0)
    for m in ("soft", "healthy"):
        join(store, m, clock.now())
    fill(store, 40, clock.now())
    quarantine(
        store,
        SubjectState(
            Subject.machine("soft"), tier=Tier.SOFT, until=clock.now() + timedelta(hours=1)
        ),
        clock.now(),
    )
    got = {"soft": 0, "healthy": 0}
    for _ in range(10):
        for m in got:
            got[m] += len(store.claim(m, clock.now(), limit=2))
        clock.advance(15)
    assert got == {"soft": 10, "healthy": 20}


def test_an_expired_soft_quarantine_claims_at_full_weight(store):
    join(store, "m", T0)
    fill(store, 4, T0)
    quarantine(
        store,
        SubjectState(Subject.machine("m"), tier=Tier.SOFT, until=T0 + timedelta(seconds=150)),
        T0,
    )
    assert len(store.claim("m", T0 + timedelta(seconds=150), limit=2)) == 2


def test_a_quarantined_task_type_is_skipped_until_its_probe(store):
    clock = ManualClock(T0)
    join(store, "m", clock.now())
    bad = ["claude", "-p", "/broken app"]
    fill(store, 3, clock.now(), prefix="bad", kind="skill", command=bad)
    fill(
        store, 2, clock.now() + timedelta(seconds=1), prefix="ok", kind="review", command=["codex"]
    )
    kind_key = task_type("skill", bad)
    quarantine(
        store,
        SubjectState(
            Subject.task_type(kind_key),
            tier=Tier.HARD,
            ejections=1,
            until=clock.now() + timedelta(minutes=10),
        ),
        clock.now(),
    )
    assert [t.task_id for t in store.claim("m", clock.now(), limit=5)] == ["ok000", "ok001"]
    [probe] = store.claim("m", clock.advance(600), limit=5)
    assert probe.task_id == "bad000"
    [state] = store.immune_states("task_type")
    assert state.probe_task == "bad000"
    assert store.claim("m", clock.now(), limit=5) == []


def test_immune_state_round_trips_and_lift_releases(store):
    s = SubjectState(
        Subject.pane("mac1", "%3"),
        tier=Tier.RECALIBRATE,
        failures=(T0, T0 + timedelta(1)),
        ejections=3,
        until=T0 + timedelta(hours=1),
        sensitivity=1,
        reason="crash loop",
        changed_at=T0,
    )
    store.save_immune(
        [s], [Action("quarantine", s.subject, s.tier, {"why": "x"})], P, T0, cursor=("immune", 7)
    )
    assert store.immune_states() == [s]
    assert store.event_cursor("immune") == 7
    store.save_immune([], [], P, T0, cursor=("immune", 3))  # a cursor never moves back
    assert store.event_cursor("immune") == 7
    assert store.lift(s.subject, T0, by="alice")
    assert not store.lift(s.subject, T0, by="alice")
    [lifted] = store.immune_states()
    assert lifted.tier == Tier.INNATE and lifted.until is None and lifted.failures == ()
    assert [e["action"] for e in store.immune_events(str(s.subject))] == ["quarantine", "lift"]


def test_antibodies_accumulate_per_signature_and_corrective(store):
    store.record_antibody("sig", "respawn_pane", True, T0)
    store.record_antibody("sig", "respawn_pane", True, T0)
    store.record_antibody("sig", "retry", False, T0)
    got = {(a.corrective, a.successes, a.failures) for a in store.antibodies()}
    assert got == {("respawn_pane", 2, 0), ("retry", 0, 1)}


def test_a_rate_limited_task_is_requeued_without_spending_an_attempt(store):
    join(store, "m", T0)
    fill(store, 1, T0)
    [t] = store.claim("m", T0)
    assert not store.requeue_unattempted(t.task_id, "other", T0, "429")
    assert store.requeue_unattempted(
        t.task_id, "m", T0, "usage limit reached|1772370000", claim_seq=t.claim_seq
    )
    task = store.get_task(t.task_id)
    assert (task.status, task.attempts, task.claimed_by) == (TaskStatus.QUEUED, 0, None)
    assert store.events(t.task_id)[-1].detail["reason"] == "rate_limited"


def test_task_events_after_a_cursor_carry_the_task_type(store):
    join(store, "m", T0)
    fill(store, 2, T0)
    store.claim("m", T0, limit=2)
    rows = store.task_events_after(0)
    assert [r["event"] for r in rows] == ["queued", "queued", "claimed", "claimed"]
    assert all(r["task_type"].startswith("skill:") for r in rows)
    assert [r["id"] for r in store.task_events_after(rows[1]["id"])] == [r["id"] for r in rows[2:]]


def test_breaker_states_of_every_process_are_kept(store):
    snap = {
        "state": "open",
        "failures": 5,
        "opened_at": T0.isoformat(),
        "retry_at": (T0 + timedelta(seconds=60)).isoformat(),
        "last_error": "503",
    }
    store.record_breaker("aura", "host-a:1", snap, T0)
    store.record_breaker("aura", "host-b:2", {**snap, "state": "closed", "failures": 0}, T0)
    store.record_breaker("aura", "host-a:1", {**snap, "failures": 6}, T0)
    rows = {(r["holder"], r["state"], r["failures"]) for r in store.breaker_rows()}
    assert rows == {("host-a:1", "open", 6), ("host-b:2", "closed", 0)}


def test_immune_events_are_append_only(store):
    s = SubjectState(Subject.machine("m"), tier=Tier.SOFT, until=T0)
    store.save_immune([s], [Action("quarantine", s.subject, s.tier)], P, T0)
    with pytest.raises(Exception, match="append-only"), store._tx() as db:
        db.execute("DELETE FROM mesh_immune_events")
