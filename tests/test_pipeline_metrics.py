"""Stage durations and retries reach `/metrics` after a real app run (Prefect harness)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from fleet import metrics
from fleet.mesh.health import HealthServer
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.settings import get_settings
from fleet.wiring import reset_components
from tests.helpers import demo_fleet, script

pytestmark = pytest.mark.usefixtures("prefect_harness")
AGENT = str(Path(__file__).resolve().parents[1] / "examples" / "demo" / "agent.py")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEET_STORE_URL", f"sqlite:///{tmp_path / 'fleet.db'}")
    monkeypatch.setenv("FLEET_RETRY_DELAY_SECONDS", "0")
    get_settings.cache_clear()
    reset_components()
    yield
    reset_components()
    get_settings.cache_clear()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=10).text
    return {(n, tuple(sorted(lab.items()))): v for n, lab, v in metrics.samples(text)}


async def test_metrics_show_stage_durations_and_a_retry_after_a_run(
    env, tmp_path, pushgateway, monkeypatch
):
    from flows.app_evolution import evolve_app

    address, pushed = pushgateway
    monkeypatch.setenv("FLEET_METRICS_PUSHGATEWAY", address)
    get_settings.cache_clear()

    # The review agent fails once (a transient AgentFailed), then works.
    marker = tmp_path / "review-failed-once"
    flaky = script(
        tmp_path,
        "flaky_review",
        "import os, sys\n"
        f"if not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    sys.stderr.write('agent crashed'); sys.exit(3)\n"
        f"os.execv(sys.executable, [sys.executable, {AGENT!r}, 'review', *sys.argv[1:]])\n",
    )
    path = demo_fleet(tmp_path, review=[*flaky, "{repo}", "{prompt}"])
    endpoint = metrics.metrics_endpoint(
        lambda: SQLiteMeshStore(tmp_path / "mesh.db"), lambda: datetime.now(UTC)
    )
    server = HealthServer(lambda: {"status": "ok"}, host="127.0.0.1", port=0, metrics=endpoint)
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        before = scrape(url)
        state = await evolve_app("demo-calc", fleet_file=str(path), return_state=True)
        assert state.is_completed(), state
        after = scrape(url)
    finally:
        server.stop()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for stage in ("skill", "review", "evolve", "ship"):
        assert delta("fleet_stage_duration_seconds_count", stage=stage) >= 1, stage
    # The failed review attempt and the good one each end a stage call.
    assert delta("fleet_stage_duration_seconds_count", stage="review") == 2
    assert delta("fleet_stage_duration_seconds_sum", stage="review") > 0
    assert delta("fleet_stage_retries_total", stage="adversarial-review") == 1
    assert delta("fleet_stage_retries_total", stage="dispatch") == 0
    # The app run pushed the same figures to the Pushgateway, under its app.
    [(method, path, body)] = pushed
    assert (method, path) == ("PUT", "/metrics/job/fleet-app/app/demo-calc")
    assert b"fleet_stage_retries_total" in body
