"""Versioned policies, canary trials and rollback on SQLite and the real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleet.errors import ConfigError
from fleet.tuning.policies import (
    LiveFigures,
    PolicyError,
    SQLitePolicyStore,
    decide,
    live_figures,
    open_policy_store,
    parse_share,
    pick_canary,
    policy_for,
)

NOW = datetime(2026, 1, 5, tzinfo=UTC)
MACHINES = [f"mac{i}" for i in range(10)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def policies(request, tmp_path):
    if request.param == "sqlite":
        yield open_policy_store(f"sqlite:///{tmp_path / 'fleet.db'}")
        return
    pg_url = request.getfixturevalue("pg_url")
    import psycopg

    store = open_policy_store(pg_url)
    yield store
    store.close()  # type: ignore[attr-defined]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE mesh_policy_log, mesh_policy_assignments, mesh_policy_trials, "
            "mesh_policies RESTART IDENTITY CASCADE"
        )


def test_a_canary_assigns_a_share_and_the_rest_keep_the_baseline(policies):
    v = policies.propose(
        {"stuck_injection_seconds": 600}, offerable=True, figures={"mttr": 1}, by="test", now=NOW
    )
    trial = policies.start_trial(
        v, MACHINES, 0.2, baseline={"stuck_injection_seconds": 900}, by="test", now=NOW
    )
    assert len(trial.machines) == 2 and trial.status == "running"
    baseline = policies.active()
    assert baseline is not None and baseline.genes == {"stuck_injection_seconds": 900.0}
    assert trial.control == baseline.version
    assignments = policies.assignments()
    for m in MACHINES:
        want = v if m in trial.machines else baseline.version
        assert policy_for(m, assignments, baseline.version) == want
    assert policies.get(v).status == "canary"
    with pytest.raises(PolicyError, match="already running"):
        other = policies.propose({"x": 1}, offerable=True, figures={}, by="t", now=NOW)
        policies.start_trial(other, MACHINES, 0.2, baseline={}, by="t", now=NOW)


def test_a_candidate_that_failed_the_guard_rail_is_never_applied(policies):
    v = policies.propose({"x": 1}, offerable=False, figures={}, by="test", now=NOW)
    with pytest.raises(PolicyError, match="guard rail"):
        policies.start_trial(v, MACHINES, 0.2, baseline={"x": 2}, by="test", now=NOW)
    assert policies.trials() == [] and policies.assignments() == {}


def test_promote_then_rollback_returns_to_the_previous_policy_and_logs_who(policies):
    v1 = policies.propose({"x": 1}, offerable=True, figures={}, by="ga", now=NOW)
    t1 = policies.start_trial(v1, MACHINES, 0.2, baseline={"x": 0}, by="alice", now=NOW)
    policies.promote(t1.id, by="flow", now=NOW + timedelta(days=1), decision={"why": "better"})
    assert policies.active().version == v1 and policies.assignments() == {}
    v2 = policies.propose({"x": 2}, offerable=True, figures={}, by="ga", now=NOW)
    t2 = policies.start_trial(v2, MACHINES, 0.3, baseline={"x": 0}, by="bob", now=NOW)
    assert t2.control == v1
    # Rolling back during a trial ends the trial; its machines go back to the control.
    assert policies.rollback(by="bob", now=NOW, reason="regressed") == v1
    assert policies.assignments() == {} and policies.get(v2).status == "rolled_back"
    # Then back past the promoted one, to the settings baseline; then nothing is left.
    baseline = t1.control
    assert policies.rollback(by="carol", now=NOW) == baseline
    assert policies.active().version == baseline
    with pytest.raises(PolicyError, match="nothing before it"):
        policies.rollback(by="carol", now=NOW)
    log = policies.log()
    assert [(e["action"], e["by_whom"]) for e in log] == [
        ("baseline", "alice"),
        ("canary", "alice"),
        ("promote", "flow"),
        ("canary", "bob"),
        ("rollback", "bob"),
        ("rollback", "carol"),
    ]


def test_the_policy_log_is_append_only(policies):
    v = policies.propose({"x": 1}, offerable=True, figures={}, by="t", now=NOW)
    policies.start_trial(v, MACHINES, 0.1, baseline={"x": 0}, by="t", now=NOW)
    # Straight at the database, past the store's named queries: the trigger refuses.
    with pytest.raises(Exception, match="append-only"):
        if isinstance(policies, SQLitePolicyStore):
            with policies._tx() as conn:
                conn.execute("DELETE FROM mesh_policy_log")
        else:
            policies._db.execute("DELETE FROM mesh_policy_log")


def test_the_canary_share_and_pick_are_checked_and_stable():
    assert parse_share("20%") == 0.2 and parse_share("0.2") == 0.2 and parse_share("20") == 0.2
    for bad in ("0%", "60%", "lots"):
        with pytest.raises(ConfigError):
            parse_share(bad)
    assert pick_canary(MACHINES, 0.2, "s") == pick_canary(list(reversed(MACHINES)), 0.2, "s")
    assert len(pick_canary(["a", "b"], 0.5, "s")) == 1
    with pytest.raises(PolicyError, match="two machines"):
        pick_canary(["a"], 0.5, "s")


def _ev(event, machine, at, task=None, reason=None):
    return {
        "event": event,
        "machine_id": machine,
        "task_id": task,
        "at": NOW + timedelta(seconds=at),
        "detail": {"reason": reason} if reason else {},
    }


def test_live_figures_count_requeues_that_proved_false_and_quick_returns():
    events = [
        _ev("claimed", "c1", 0, "t1"),
        _ev("Progress", "c1", 100, "t1"),
        _ev("queued", "c1", 400, "t1", "stuck"),
        _ev("Progress", "c1", 450, "t1"),  # alive: FP
        _ev("claimed", "c2", 0, "t2"),
        _ev("queued", "c2", 900, "t2", "stuck"),  # real
        _ev("MachineDown", "c2", 1000),
        _ev("MachineUp", "c2", 1200),  # back: FP
        _ev("claimed", "k1", 0, "t3"),
        _ev("queued", "k1", 1000, "t3", "stuck"),
    ]
    canary = live_figures(events, ["c1", "c2"], NOW, NOW + timedelta(days=1))
    assert (canary.requeues, canary.false_positives) == (2, 2)
    assert canary.mttr == pytest.approx((300 + 900) / 2)
    control = live_figures(events, ["k1"], NOW, NOW + timedelta(days=1))
    assert (control.requeues, control.false_positives) == (1, 0)
    assert decide(canary, control, 3600)[0] == "rollback"


def test_a_trial_waits_its_day_then_promotes_unless_it_regressed():
    good = LiveFigures(2, 1, 3, 0, 300)
    ctl = LiveFigures(8, 1, 12, 0, 600)
    assert decide(good, ctl, 3600)[0] == "wait"
    assert decide(good, ctl, 86400)[0] == "promote"
    assert decide(LiveFigures(2, 1, 3, 0, 900), ctl, 86400)[0] == "rollback"


def test_the_policy_in_force_is_the_active_version_else_the_settings(tmp_path):
    from fleet.settings import FleetSettings
    from fleet.tuning.genome import current_policy
    from fleet.tuning.tuner import in_force

    settings = FleetSettings()
    store = open_policy_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    assert in_force(store, settings) == current_policy(settings)
    genes = {**current_policy(settings), "stuck_injection_seconds": 600.0}
    v = store.propose(genes, offerable=True, figures={}, by="t", now=NOW)
    trial = store.start_trial(v, MACHINES, 0.2, baseline=current_policy(settings), by="t", now=NOW)
    assert in_force(store, settings) == current_policy(settings)  # a canary is not in force
    store.promote(trial.id, by="t", now=NOW, decision={})
    assert in_force(store, settings) == genes
