"""The optimizer (seed 003's optimizer agent): NSGA-II (pymoo) over the genome, minimising MTTR
and false positives on replayed histories, with a memetic local search around the best of each
generation. Deterministic under a seed.

Guard rail: a candidate that adds a false positive over the current policy on any labelled
history is infeasible for NSGA-II (an inequality constraint) and never offered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet.tuning.genome import GENES, Policy, from_vector, key, repair, to_vector
from fleet.tuning.history import History
from fleet.tuning.replay import Prepared, Score, combine, score

LOWER = np.array([g.low for g in GENES])
UPPER = np.array([g.high for g in GENES])


@dataclass(frozen=True)
class Candidate:
    policy: Policy
    score: Score  # over every history
    per_history: tuple[Score, ...]
    offerable: bool  # passes the guard rail
    why_not: str = ""


@dataclass(frozen=True)
class Generation:
    n: int
    evaluations: int
    best_mttr: float  # best penalized MTTR among offerable candidates so far
    best_false_positives: int
    front: int  # size of the offerable Pareto front so far


@dataclass(frozen=True)
class Evolution:
    current: Candidate
    front: tuple[Candidate, ...]  # offerable, non-dominated, by MTTR
    generations: tuple[Generation, ...]
    converged_at: int  # the generation after which the best stopped improving
    evaluations: int
    seconds: float
    seed: int

    def best(self) -> Candidate | None:
        """The fastest healer with no more false positives than the current policy."""
        cur = self.current.score.false_positives
        ok = [c for c in self.front if c.score.false_positives <= cur]
        return min(
            ok, key=lambda c: (c.score.penalized_mttr, c.score.false_positives), default=None
        )


def guard(
    candidate: Sequence[Score], current: Sequence[Score], labelled: Sequence[bool]
) -> tuple[float, str]:
    """(excess, why): the most false positives the candidate adds over the current policy on one
    labelled history (> 0: never offered), and which history."""
    worst, why = -np.inf, ""
    for c, base, is_labelled in zip(candidate, current, labelled, strict=True):
        if not is_labelled:
            continue
        excess = c.false_positives - base.false_positives
        if excess > worst:
            worst, why = excess, f"{excess:+d} false positives on a labelled history"
    if worst == -np.inf:
        return 0.0, ""
    return float(worst), (why if worst > 0 else "")


class Evaluator:
    """Scores policies on prepared histories, once per distinct policy."""

    def __init__(self, histories: Sequence[History], settings: Any):
        self.prepared = [Prepared(h) for h in histories]
        self.labelled = [h.labelled for h in histories]
        self.settings = settings
        self.archive: dict[tuple[float, ...], Candidate] = {}
        self.baseline: tuple[Score, ...] | None = None

    def __call__(self, policy: Mapping[str, float]) -> Candidate:
        k = key(policy)
        if k not in self.archive:
            per = tuple(score(p, policy, self.settings) for p in self.prepared)
            if self.baseline is None:
                self.baseline = per
            excess, why = guard(per, self.baseline, self.labelled)
            self.archive[k] = Candidate(dict(policy), combine(per), per, excess <= 0, why)
        return self.archive[k]

    @property
    def evaluations(self) -> int:
        return len(self.archive)


def _better(a: Candidate, b: Candidate) -> bool:
    """a dominates b among offerable candidates (or is offerable where b is not)."""
    if a.offerable != b.offerable:
        return a.offerable
    fa, fb = a.score.objectives(), b.score.objectives()
    pairs = list(zip(fa, fb, strict=True))
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def local_search(
    start: Candidate,
    evaluate: Callable[[Mapping[str, float]], Candidate],
    rng: np.random.Generator,
    budget: int,
) -> Candidate:
    """The memetic step: coordinate moves (a tenth of each gene's range, then finer) from
    `start`, keeping a move only when it dominates; at most `budget` evaluations."""
    best, spent, scale = start, 0, 0.1
    while spent < budget and scale >= 0.02:
        improved = False
        for gi in rng.permutation(len(GENES)):
            gene = GENES[gi]
            for sign in (-1, 1):
                if spent >= budget:
                    return best
                trial = dict(best.policy)
                trial[gene.name] += sign * max(gene.step, scale * (gene.high - gene.low))
                trial = repair(trial)
                if key(trial) == key(best.policy):
                    continue
                spent += 1
                cand = evaluate(trial)
                if _better(cand, best):
                    best, improved = cand, True
                    break
        if not improved:
            scale /= 2
    return best


def _front(cands: Sequence[Candidate]) -> list[Candidate]:
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    ok = [c for c in cands if c.offerable]
    if not ok:
        return []
    F = np.array([c.score.objectives() for c in ok])
    first = NonDominatedSorting().do(F, only_non_dominated_front=True)
    unique: dict[tuple[float, float], Candidate] = {}
    for i in sorted(int(j) for j in first):
        unique.setdefault(ok[i].score.objectives(), ok[i])
    return sorted(unique.values(), key=lambda c: c.score.objectives())


def evolve(
    histories: Sequence[History],
    settings: Any,
    current: Mapping[str, float],
    *,
    steps: int = 10,
    pop_size: int = 20,
    seed: int = 0,
    memetic: int = 2,
    local_budget: int = 6,
    evaluator: Evaluator | None = None,
) -> Evolution:
    """Run NSGA-II for `steps` generations from a population holding the current policy."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator as PymooEvaluator
    from pymoo.core.problem import Problem
    from pymoo.problems.static import StaticProblem

    started = time.perf_counter()
    ev = evaluator or Evaluator(histories, settings)
    base = ev(dict(current))  # first: the guard's baseline
    rng = np.random.default_rng(seed)
    X0 = rng.uniform(LOWER, UPPER, size=(pop_size, len(GENES)))
    X0[0] = np.clip(to_vector(current), LOWER, UPPER)
    problem = Problem(n_var=len(GENES), n_obj=2, n_ieq_constr=1, xl=LOWER, xu=UPPER)
    algorithm = NSGA2(pop_size=pop_size, sampling=X0, eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", max(1, steps)), seed=seed, verbose=False)
    generations: list[Generation] = []
    while algorithm.has_next():
        pop = algorithm.ask()
        X = pop.get("X")
        cands = [ev(from_vector(x)) for x in X]
        # Memetic: refine the best few of this generation and write them back (Lamarckian).
        order = sorted(
            range(len(cands)), key=lambda i: (not cands[i].offerable, cands[i].score.objectives())
        )
        for i in order[:memetic]:
            cands[i] = local_search(cands[i], ev, rng, local_budget)
            X[i] = to_vector(cands[i].policy)
        pop.set("X", X)
        F = np.array([c.score.objectives() for c in cands])
        G = np.array(
            [
                [0.0 if c.offerable else guard(c.per_history, base.per_history, ev.labelled)[0]]
                for c in cands
            ]
        )
        PymooEvaluator().eval(StaticProblem(problem, F=F, G=G), pop)
        algorithm.tell(infills=pop)
        front = _front(list(ev.archive.values()))
        best = min(front, key=lambda c: c.score.objectives(), default=base)
        generations.append(
            Generation(
                len(generations) + 1,
                ev.evaluations,
                best.score.penalized_mttr,
                best.score.false_positives,
                len(front),
            )
        )
    front = _front(list(ev.archive.values()))
    return Evolution(
        base,
        tuple(front),
        tuple(generations),
        converged_generation(generations),
        ev.evaluations,
        time.perf_counter() - started,
        seed,
    )


def converged_generation(generations: Sequence[Generation], tolerance: float = 0.01) -> int:
    """The last generation that improved the best MTTR by more than `tolerance` (a share)."""
    last, best = 0, np.inf
    for g in generations:
        if g.best_mttr < best * (1 - tolerance):
            last = g.n
        best = min(best, g.best_mttr)
    return last
