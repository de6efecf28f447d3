"""The optimizer: deterministic under a seed, the current policy in the first population, and
the guard rail (no candidate adding a false positive on a labelled history is offered)."""

from __future__ import annotations

import pytest

from fleet.settings import FleetSettings
from fleet.tuning import history as hist
from fleet.tuning.genome import GENES, current_policy, from_vector, key, repair, to_vector
from fleet.tuning.optimizer import Evaluator, evolve, guard
from fleet.tuning.replay import Score

SETTINGS = FleetSettings()


@pytest.fixture(scope="module")
def histories() -> list[hist.History]:
    return [
        hist.synthetic(["healthy", "slow", "dead"], days=0.2, seed=1, name="a"),
        hist.synthetic(["flaky", "slow", "rate_limited"], days=0.2, seed=2, name="b"),
    ]


def _run(histories, seed: int):
    return evolve(
        histories,
        SETTINGS,
        current_policy(SETTINGS),
        steps=2,
        pop_size=6,
        seed=seed,
        memetic=1,
        local_budget=3,
    )


def test_the_same_seed_gives_the_same_front_and_convergence(histories):
    a, b = _run(histories, 5), _run(histories, 5)
    assert [key(c.policy) for c in a.front] == [key(c.policy) for c in b.front]
    assert a.generations == b.generations and a.evaluations == b.evaluations


def test_the_current_policy_is_evaluated_first_and_is_the_guard_baseline(histories):
    ev = Evaluator(histories, SETTINGS)
    evolve(
        histories,
        SETTINGS,
        current_policy(SETTINGS),
        steps=1,
        pop_size=4,
        seed=0,
        memetic=0,
        evaluator=ev,
    )
    first = next(iter(ev.archive))
    assert first == key(current_policy(SETTINGS))
    assert ev.baseline == ev.archive[first].per_history


def test_no_offered_candidate_adds_a_false_positive_on_any_labelled_history(histories):
    evo = _run(histories, 3)
    base = evo.current.per_history
    assert evo.front
    for c in evo.front:
        assert c.offerable
        pairs = zip(c.per_history, base, strict=True)
        assert all(x.false_positives <= y.false_positives for x, y in pairs)


def _s(fp: int) -> Score:
    return Score(0, 0, fp, 0, 0, 0, 0)


def test_the_guard_refuses_any_added_false_positive_on_a_labelled_history_only():
    assert guard([_s(1), _s(0)], [_s(1), _s(0)], [True, True]) == (0.0, "")
    excess, why = guard([_s(0), _s(2)], [_s(1), _s(0)], [True, True])
    assert excess == 2 and "+2 false positives" in why
    # A recorded (unlabelled) history does not count: its "false positives" are inferred.
    assert guard([_s(0), _s(2)], [_s(0), _s(0)], [True, False])[0] == 0


def test_a_policy_trivially_more_aggressive_is_refused_by_the_guard():
    h = [hist.synthetic(["slow", "slow"], days=0.5, seed=4, name="slow")]
    ev = Evaluator(h, SETTINGS)
    ev(current_policy(SETTINGS))
    eager = ev(
        repair(
            {
                **current_policy(SETTINGS),
                "liveness_confirmations": 1,
                "stuck_injection_seconds": 180,
            }
        )
    )
    assert not eager.offerable and "false positives" in eager.why_not


def test_the_genome_repairs_out_of_bounds_and_disordered_values():
    wild = from_vector([0, 10**6, 99, 1, 1, 8, 3, 0, 0, 0])
    for g in GENES:
        assert g.low <= wild[g.name] <= g.high
    assert wild["immune_hard_failures"] > wild["immune_soft_failures"]
    assert from_vector(to_vector(wild)) == wild
