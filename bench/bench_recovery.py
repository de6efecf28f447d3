"""The pipeline's MTTR, printed: time to resume after a `kill -9` of `fleet run` (a rerun on the
same host; a standby on another host) and after a cut of the PostgreSQL store.

Real `fleet run` processes on the Aura and Hydra dev servers (tests/chaos/test_kill.py's rig):
the run is killed (its whole process group) while its apps' review is running, then
- rerun: a new `fleet run` on this host; resumed = every app claimed by the new run;
- standby: a `fleet run` that sees another hostname, so it must wait out the dead run's lease
  (FLEET_APP_LEASE_SECONDS, 6 s here; 60 s by default) before it may take the apps.
Store outage: the same fleet on the real PostgreSQL through tests/chaos/proxy.py's proxy, cut for
`--cut` seconds while the apps' review runs (the review finishes during the cut); the figure is
the time from the restore to each app's next stage write.
Local agents: the same fleet with its agents on the local executor, killed during SKILL; the
figure is the time until no agent of the dead run is left (the reaper's work, no rerun).

    uv run python bench/bench_recovery.py [--pg postgresql://…] [--cut 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.devservers.aura import AuraDevServer  # noqa: E402
from fleet.devservers.hydra import HydraDevServer  # noqa: E402
from fleet.models import Stage  # noqa: E402
from tests.chaos.test_kill import APPS, TOKEN, Rig, finish, kill_group  # noqa: E402
from tests.chaos.test_outage_run import pg_rig_on  # noqa: E402

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def poll(until: Callable[[], bool], timeout: float = 180) -> float:
    """Seconds until `until()` holds (polled every 50 ms)."""
    started = time.monotonic()
    while not until():
        if time.monotonic() - started > timeout:
            raise TimeoutError("the moment never came")
        time.sleep(0.05)
    return time.monotonic() - started


def owners(rig: Rig) -> dict[str, str | None]:
    store = rig.store
    try:
        return {a: (s.owner if (s := store.get_state(a)) else None) for a in APPS}
    finally:
        store.close()


def kill_figures(root: Path, aura: AuraDevServer, hydra: HydraDevServer, standby: bool) -> None:
    rig = Rig(root, aura, hydra, held="review")
    first = rig.start("first")
    try:
        rig.wait_until(lambda: rig.in_stage(Stage.ADVERSARIAL_RUNNING), first)
        dead = owners(rig)
    finally:
        kill_group(first)
    killed = time.monotonic()
    if standby:
        rig.lease_over()
    second = rig.start("second", other_host=standby)
    rig.release()
    poll(lambda: all(o != dead[a] for a, o in owners(rig).items()))
    resumed_at = time.monotonic() - killed
    code = finish(second)
    done = time.monotonic() - killed
    complete = sum(s is Stage.COMPLETE for s in rig.stages().values())
    where = "standby (other host)" if standby else "rerun (same host)"
    print(
        f"kill -9 during review, {where}: apps resumed {resumed_at:.1f} s after the kill, "
        f"all complete {done:.1f} s after (exit {code}, {complete}/{len(APPS)} complete)"
    )


def outage_figures(root: Path, aura: AuraDevServer, hydra: HydraDevServer, pg: str, cut: float):
    with pg_rig_on(root, aura, hydra, pg) as (rig, proxy):
        run = rig.start("outage")
        try:
            rig.wait_until(lambda: rig.in_stage(Stage.ADVERSARIAL_RUNNING), run)
            proxy.cut()
            rig.release()  # the review ends during the cut: its result waits for the store
            time.sleep(cut)
            proxy.restore()
            restored = time.monotonic()
            firsts: dict[str, float] = {}

            def moved() -> bool:
                for app, stage in rig.stages().items():
                    if app not in firsts and stage is not Stage.ADVERSARIAL_RUNNING:
                        firsts[app] = time.monotonic() - restored
                return len(firsts) == len(APPS)

            poll(moved)
            code = finish(run)
        finally:
            kill_group(run)
        stages = rig.stages()
        out = rig.output("outage")
    print(
        f"store cut {cut:.0f} s during review: next stage write "
        + ", ".join(f"{a} {t:.1f} s" for a, t in sorted(firsts.items()))
        + f" after the restore; run exit {code}, "
        f"{sum(s is Stage.COMPLETE for s in stages.values())}/{len(APPS)} complete, "
        f"{out.count('Traceback')} tracebacks"
    )


def local_agents_figure(root: Path, aura: AuraDevServer, hydra: HydraDevServer) -> None:
    rig = Rig(root, aura, hydra, held="skill", local=True)
    first = rig.start("first")
    try:
        rig.wait_until(lambda: rig.in_stage(Stage.SKILL_RUNNING), first)
        running = len(rig.agents_left())
    finally:
        kill_group(first)
    gone = poll(lambda: not rig.agents_left(), timeout=30)
    rig.release()
    print(
        f"kill -9 during skill, agents on the local executor: {running} agent processes "
        f"gone {gone:.2f} s after the kill (no rerun needed)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL admin URL (a throwaway db)")
    parser.add_argument("--cut", type=float, default=10.0, help="store cut, seconds")
    parser.add_argument("--skip-outage", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        root = Path(tmp)
        hydra = HydraDevServer(token=TOKEN).start()
        try:
            # A gateway per scenario: effect keys repeat across fleets with the same app ids.
            for standby in (False, True):
                with AuraDevServer(token=TOKEN, workdir=root / f"gw-{standby}") as aura:
                    kill_figures(root / f"kill-{standby}", aura, hydra, standby)
            with AuraDevServer(token=TOKEN, workdir=root / "gw-local") as aura:
                local_agents_figure(root / "local", aura, hydra)
            if not args.skip_outage:
                with AuraDevServer(token=TOKEN, workdir=root / "gw-outage") as aura:
                    outage_figures(root / "outage", aura, hydra, args.pg, args.cut)
        finally:
            hydra.stop()


if __name__ == "__main__":
    main()
