"""Benchmark of the healing tuner: the tuned policy vs the defaults of DESIGN.md on labelled
histories (MTTR, false positives, misses), generations to converge, and the wall time of an
evolve over 7 days of a 10-machine mesh (target ≤ 60 s), with the load average beside it.

    uv run python bench/bench_tune.py [--steps 10] [--population 20] [--seed 0]

Tuned on seed S (4 labelled histories + a 10-machine week); judged again on seed S+1 (held out).
"""

from __future__ import annotations

import argparse
import os
import time

from fleet.settings import FleetSettings
from fleet.tuning import history as hist
from fleet.tuning.genome import GENE_NAMES, current_policy
from fleet.tuning.optimizer import Candidate, Evaluator, evolve
from fleet.tuning.replay import Score


def _row(name: str, s: Score, base: Score) -> str:
    change = s.penalized_mttr / base.penalized_mttr - 1 if base.penalized_mttr else 0.0
    return (
        f"  {name:<22} MTTR {s.penalized_mttr:7.0f} s ({change:+5.0%})  healed-only "
        f"{s.mttr:6.0f} s  false pos. {s.false_positives:3d}  misses {s.misses:3d}/"
        f"{s.faults:<3d}  work lost {s.work_lost / 3600:5.1f} h"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    settings = FleetSettings()
    defaults = current_policy(settings)

    t0 = time.perf_counter()
    train = hist.labelled_histories(args.seed) + [hist.mesh_week(args.seed, machines=10, days=7)]
    generated = time.perf_counter() - t0
    load_before = os.getloadavg()
    t1 = time.perf_counter()
    cpu = time.process_time()
    evaluator = Evaluator(train, settings)
    prepared = time.perf_counter() - t1
    evo = evolve(
        train,
        settings,
        defaults,
        steps=args.steps,
        pop_size=args.population,
        seed=args.seed,
        evaluator=evaluator,
    )
    wall = time.perf_counter() - t1
    cpu = time.process_time() - cpu
    load_after = os.getloadavg()

    print(
        f"evolve: {args.steps} generations × {args.population}, seed {args.seed}, "
        f"{evo.evaluations} policies replayed"
    )
    print(
        f"  history: 4 labelled (1 day, 4 machines each) + 10 machines × 7 days "
        f"({sum(len(h.tasks) for h in train)} task runs); generated in {generated:.1f} s"
    )
    print(
        f"  wall time {wall:.1f} s (of which preparing the histories {prepared:.1f} s; "
        f"target ≤ 60 s); CPU time {cpu:.1f} s; load average before {load_before[0]:.1f}, "
        f"after {load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(f"  converged at generation {evo.converged_at} of {args.steps}")
    for g in evo.generations:
        print(
            f"    gen {g.n:2d}: {g.evaluations:4d} evaluations, best MTTR {g.best_mttr:6.0f} s "
            f"({g.best_false_positives} false pos.), front {g.front}"
        )

    base = evo.current
    zero = min(
        (c for c in evo.front if c.score.false_positives == 0),
        key=lambda c: c.score.penalized_mttr,
        default=None,
    )
    best = evo.best()
    print(f"\ntrained on (seed {args.seed}):")
    print(_row("defaults (DESIGN.md)", base.score, base.score))
    picks: list[tuple[str, Candidate]] = []
    if best is not None:
        picks.append(("tuned (≤ defaults' FP)", best))
    if zero is not None:
        picks.append(("tuned at 0 false pos.", zero))
    for name, c in picks:
        print(_row(name, c.score, base.score))
    print(
        "  Pareto front (MTTR s, false pos., misses):",
        ", ".join(
            f"({c.score.penalized_mttr:.0f}, {c.score.false_positives}, {c.score.misses})"
            for c in evo.front
        ),
    )

    held = hist.labelled_histories(args.seed + 1) + [hist.mesh_week(args.seed + 1)]
    judge = Evaluator(held, settings)
    hb = judge(defaults)
    print(f"\nheld out (seed {args.seed + 1}):")
    print(_row("defaults (DESIGN.md)", hb.score, hb.score))
    for name, c in picks:
        hc = judge(c.policy)
        per = ", ".join(
            f"{h.name} {x.false_positives}" for h, x in zip(held, hc.per_history, strict=True)
        )
        guard = "ok" if hc.offerable else "FAILED"
        print(_row(name, hc.score, hb.score) + f"   guard {guard} ({per})")
    for name, c in picks:
        moved = {n: (defaults[n], c.policy[n]) for n in GENE_NAMES if c.policy[n] != defaults[n]}
        print(f"\n{name}: " + ", ".join(f"{n} {a:g}→{b:g}" for n, (a, b) in moved.items()))


if __name__ == "__main__":
    main()
