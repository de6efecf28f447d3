"""The UI test's operator, as a child process on the test's Prefect server (PREFECT_API_URL):
serves app-evolution/per-app the way a worker would, runs one fanned-out cohort, and prints
the cohort run's id and final state as one JSON line.

    python -m tests.ui.cohort_driver FLEET_FILE SIZE
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys


async def main(fleet_file: str, size: int) -> dict[str, object]:
    from prefect.runner import Runner

    from flows.app_evolution import evolve_app
    from flows.cohort import fleet_cohort

    # No deployment tags: the app runs' tags are the ones the cohort gives them.
    runner = Runner(name="ui-test-worker", query_seconds=1)
    await runner.add_flow(evolve_app, name="per-app")
    serving = asyncio.create_task(runner.start())
    try:
        state = await fleet_cohort(
            size=size, fleet_file=fleet_file, fan_out=True, return_state=True
        )
    finally:
        await runner.stop()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    return {
        "flow_run_id": str(state.state_details.flow_run_id),
        "type": state.type.value,
        "name": state.name,
        "message": state.message,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2])))), flush=True)
