"""Replay scoring on tiny hand-made histories with known answers, and the replay's shortcuts
checked against the pure rules asked at every tick."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.mesh import rules
from fleet.settings import FleetSettings
from fleet.tuning import history as hist
from fleet.tuning.genome import current_policy, repair
from fleet.tuning.history import INF, Episode, History, MachineTrack, TaskRun
from fleet.tuning.replay import RECONCILE_SECONDS, Prepared, _verdict, score

SETTINGS = FleetSettings()
DEFAULT = current_policy(SETTINGS)


def policy(**changes: float) -> dict[str, float]:
    return repair({**DEFAULT, **changes})


def beats(until: float, start: float = 0.0, gap: tuple[float, float] | None = None) -> np.ndarray:
    b = np.arange(start, until + 1e-9, 30.0)
    if gap:
        b = b[(b <= gap[0]) | (b >= gap[1])]
    return b


def one_machine(
    tasks: list[TaskRun],
    *,
    horizon: float = 7200.0,
    died_at: float | None = None,
    unreachable: tuple[tuple[float, float], ...] = (),
    gap=None,
) -> History:
    label: hist.Label = "dead" if died_at is not None else "healthy"
    b = beats(died_at if died_at is not None else horizon, gap=gap)
    episodes = (Episode("machine:m1", died_at),) if died_at is not None else ()
    machine = MachineTrack("m1", label, b, unreachable, died_at)
    return History("tiny", hist.START, horizon, (machine,), tuple(tasks), episodes)


def test_a_hung_task_is_healed_one_stuck_timeout_after_its_last_progress():
    progress = tuple(float(t) for t in range(60, 961, 60))
    h = one_machine([TaskRun("t1", "m1", "%0", 0.0, progress, hung_at=960.0)])
    s = score(Prepared(h), DEFAULT, SETTINGS)
    # 960 + 900 s = 1860 → the reconciler's next tick, 1920: 960 s after the hang.
    assert (s.detected, s.misses, s.false_positives) == (1, 0, 0)
    assert s.mttr == pytest.approx(960.0)
    fast = score(Prepared(h), policy(stuck_injection_seconds=300), SETTINGS)
    assert fast.mttr == pytest.approx(1320 - 960)


def test_a_quiet_healthy_task_requeued_by_a_short_timeout_is_a_false_positive_with_its_work_lost():
    # Progress every minute, one silent 10-minute build step, done at 3000 s.
    progress = (60.0, 120.0, 720.0, 780.0, 1500.0, 2200.0, 2900.0)
    h = one_machine([TaskRun("t1", "m1", "%0", 0.0, progress, 3000.0, "success")])
    assert score(Prepared(h), DEFAULT, SETTINGS).false_positives == 0
    s = score(Prepared(h), policy(stuck_injection_seconds=300), SETTINGS)
    # 120 + 300 = 420 → tick 480: the task had run 480 s.
    assert (s.false_positives, s.faults, s.work_lost) == (1, 0, 480.0)


def test_a_dead_machine_is_declared_down_after_the_confirmations_and_its_task_requeued():
    h = one_machine(
        [TaskRun("t1", "m1", "%0", 0.0, (300.0, 540.0), hung_at=600.0)],
        died_at=600.0,
        unreachable=((600.0, INF),),
    )
    # Last beat 600; missed after 1.5 periods (645); the next liveness round (660) takes both
    # failed probes, 5 s apart, as the live LivenessProbe does → down at 665.
    s = score(Prepared(h), DEFAULT, SETTINGS)
    downs = [d for d in s.decisions if d.kind == "down"]
    assert [(d.at, d.false_positive) for d in downs] == [(665.0, False)]
    assert (s.detected, s.misses, s.false_positives) == (2, 0, 0)
    assert s.mttr == pytest.approx(65.0)  # the machine and its task, both at 665
    one = score(Prepared(h), policy(liveness_confirmations=1), SETTINGS)
    assert one.mttr == pytest.approx(60.0)


def test_a_network_blip_kills_a_live_machine_only_under_a_single_confirmation():
    task = TaskRun(
        "t1", "m1", "%0", 0.0, tuple(float(t) for t in range(60, 3500, 60)), 3600.0, "success"
    )
    # Missed after 1045; the round at 1080 fails once, and the machine answers before the
    # second probe (1085): alive under two confirmations, down under one.
    h = one_machine([task], gap=(1000.0, 1082.0), unreachable=((1000.0, 1082.0),))
    assert score(Prepared(h), DEFAULT, SETTINGS).false_positives == 0
    s = score(Prepared(h), policy(liveness_confirmations=1), SETTINGS)
    # The machine declared down and its healthy task requeued: two false positives.
    assert s.false_positives == 2
    assert {d.kind for d in s.decisions if d.false_positive} == {"down", "requeue"}


def _pane_history(outcomes: list[str], *, flaky: bool) -> History:
    tasks = [
        TaskRun(
            f"t{i}",
            "m1",
            "%0",
            i * 120.0,
            (i * 120.0 + 30,),
            i * 120.0 + 100,
            o,  # type: ignore[arg-type]
            "boom" if o == "failure" else "",
        )
        for i, o in enumerate(outcomes)
    ]
    episodes = (Episode("pane:m1/%0", 0.0, 4000.0),) if flaky else ()
    h = one_machine(tasks)
    return History("pane", h.start, h.horizon, h.machines, h.tasks, episodes)


def test_a_flaky_pane_is_quarantined_and_that_heals_its_fault():
    h = _pane_history(["failure", "failure", "failure", "success"], flaky=True)
    s = score(Prepared(h), policy(immune_window_heartbeats=20), SETTINGS)
    q = [d for d in s.decisions if d.kind == "quarantine" and d.subject == "pane:m1/%0"]
    assert q and q[0].at == 340.0 and not q[0].false_positive
    assert s.detected == 1 and s.mttr == pytest.approx(340.0)


def test_quarantining_a_healthy_pane_is_a_false_positive():
    h = _pane_history(["failure", "failure", "failure", "success"], flaky=False)
    s = score(Prepared(h), policy(immune_window_heartbeats=20), SETTINGS)
    assert s.false_positives >= 1
    lenient = score(
        Prepared(h),
        policy(immune_window_heartbeats=20, immune_soft_failures=4, immune_hard_failures=6),
        SETTINGS,
    )
    assert lenient.false_positives == 0


@pytest.fixture(scope="module")
def small() -> History:
    return hist.synthetic(["healthy", "slow", "dead", "flaky"], days=0.25, seed=3, hang_rate=0.1)


def test_the_reconcile_shortcut_matches_the_rule_asked_at_every_tick(small):
    """numpy only skips rows the rule cannot act on: ask classify at every tick instead."""
    p = Prepared(small)
    pol = policy(stuck_injection_seconds=300, orphan_claim_seconds=180, liveness_confirmations=6)
    th = rules.Thresholds(180, 300, SETTINGS.task_expiry_seconds, SETTINGS.max_task_attempts)
    got = {d.subject: d.at for d in score(p, pol, SETTINGS).decisions if d.kind == "requeue"}
    downs = {d.subject for d in score(p, pol, SETTINGS).decisions if d.kind == "down"}
    want = {}
    for i, task in enumerate(p.tasks):
        if task.machine_id in downs:
            continue
        t = (np.floor(task.claimed_at / RECONCILE_SECONDS) + 1) * RECONCILE_SECONDS
        while t < p.end[i]:
            if _verdict(p, i, float(t), down=False, th=th) is not None:
                want[task.task_id] = float(t)
                break
            t += RECONCILE_SECONDS
    got = {k: v for k, v in got.items() if not any(k.startswith(m) for m in downs)}
    assert got == want and want


def test_the_immune_shortcut_matches_feeding_every_observation(small):
    p = Prepared(small)
    for pol in (
        DEFAULT,
        policy(immune_soft_failures=2, immune_hard_failures=3, immune_window_heartbeats=40),
    ):
        quick = [d for d in score(p, pol, SETTINGS).decisions if d.kind == "quarantine"]
        exact = [
            d
            for d in score(p, pol, SETTINGS, exact_immune=True).decisions
            if d.kind == "quarantine"
        ]
        assert quick == exact


def test_synthetic_histories_are_deterministic_under_a_seed():
    a = hist.synthetic(["slow", "flaky"], seed=7, days=0.2)
    b = hist.synthetic(["slow", "flaky"], seed=7, days=0.2)
    assert [t.progress for t in a.tasks] == [t.progress for t in b.tasks]
    assert all(
        np.array_equal(x.heartbeats, y.heartbeats)
        for x, y in zip(a.machines, b.machines, strict=True)
    )
    c = hist.synthetic(["slow", "flaky"], seed=8, days=0.2)
    assert [t.progress for t in a.tasks] != [t.progress for t in c.tasks]
