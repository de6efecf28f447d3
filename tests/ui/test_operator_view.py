"""What an operator sees, proven in a real browser: one `prefect server`, one fanned-out cohort
of two demo apps (demo-notes' skill agent exits 1), then the Prefect API and headless Chromium
say the cohort failed, how runs are named and tagged, what the artifacts count, where the
failing app's error is, and that the fleet's automations are installed."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.automations import ALERT_NAMES
from tests.helpers import PY, demo_fleet, script
from tests.ui.harness import (
    ROOT,
    Api,
    Page,
    PrefectServer,
    eventually,
    png_size,
    render,
    run_header,
)

OK, BROKEN = "demo-calc", "demo-notes"
REASON = f"skill agent crashed on {BROKEN}"
SIZE = 2
# Generous: on a 2-core machine shared with other work the cohort alone took 60–150 s.
DRIVER_TIMEOUT = 240
# A server start, a cohort and three pages in a browser, timed against the first test.
pytestmark = pytest.mark.timeout(600)


@dataclass
class Seen:
    """One cohort run on the test's server, and what the API and the browser show of it."""

    api: Api
    driver: dict[str, Any]
    cohort: dict[str, Any]
    apps: dict[str, dict[str, Any]]
    pages: dict[str, Page] = field(default_factory=dict)


def fleet_with_a_failing_app(tmp: Path) -> Path:
    """The demo fleet cut to two apps; the skill agent of BROKEN exits 1 with REASON."""
    path = demo_fleet(tmp)
    data = yaml.safe_load(path.read_text())
    wrapper = script(
        tmp,
        "skill_or_crash",
        "import os, sys\n"
        "app_id, *agent = sys.argv[1:]\n"
        f"if app_id == {BROKEN!r}:\n"
        f"    sys.exit({REASON!r})\n"
        "os.execv(agent[0], agent)\n",
    )
    data["commands"]["skill"] = [*wrapper, "{app_id}", *data["commands"]["skill"]]
    data["apps"] = [a for a in data["apps"] if a["id"] in (OK, BROKEN)]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def seen(
    chromium: str, prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seen]:
    tmp = tmp_path_factory.mktemp("ui-cohort")
    fleet_file = fleet_with_a_failing_app(tmp)
    env = prefect_server.env(
        FLEET_HOME=str(tmp / "home"),
        FLEET_STORE_URL=f"sqlite:///{tmp / 'fleet.db'}",
        FLEET_APP_DEPLOYMENT="app-evolution/per-app",
        FLEET_COHORT_POLL_SECONDS="1",
        FLEET_HYDRA_POLL_SECONDS="1",
        FLEET_STAGE_RETRIES="0",
    )
    # The operator's install, next to the cohort run (its webhook is never reached here).
    install = subprocess.Popen(
        [PY, "-m", "fleet.cli", "automations", "install"]
        + ["--webhook-url", "http://127.0.0.1:9/fleet-alerts"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with (tmp / "driver.log").open("w") as log:
        driver = subprocess.run(
            [PY, "-m", "tests.ui.cohort_driver", str(fleet_file), str(SIZE)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=DRIVER_TIMEOUT,
            check=False,
        )
    installed, _ = install.communicate(timeout=DRIVER_TIMEOUT)
    assert driver.returncode == 0, (tmp / "driver.log").read_text()[-4000:]
    assert install.returncode == 0, installed

    api = Api(prefect_server.api_url)
    [cohort] = api.flow_runs("fleet-cohort")
    apps = {r["parameters"]["app_id"]: r for r in api.flow_runs("app-evolution")}
    result = Seen(api, json.loads(driver.stdout.splitlines()[-1]), cohort, apps)

    ui = prefect_server.url
    for page, url, until in [
        ("cohort", f"{ui}/runs/flow-run/{cohort['id']}", [cohort["name"], BROKEN]),
        ("app", f"{ui}/runs/flow-run/{apps[BROKEN]['id']}", [REASON]),
        ("automations", f"{ui}/automations", ALERT_NAMES),
    ]:
        result.pages[page] = render(chromium, url, tmp / f"{page}.png", until)
    yield result
    api.close()


# States -------------------------------------------------------------------------------------


def test_the_cohort_with_a_failed_app_ends_failed(seen: Seen) -> None:
    state = seen.cohort["state"]
    assert (state["type"], seen.driver["type"]) == ("FAILED", "FAILED"), state


def test_the_failed_app_run_is_failed_with_its_reason_and_the_other_completed(seen: Seen) -> None:
    broken, ok = seen.apps[BROKEN]["state"], seen.apps[OK]["state"]
    assert broken["type"] == "FAILED" and REASON in (broken["message"] or ""), broken
    assert ok["type"] == "COMPLETED", ok


def test_the_cohort_logs_the_failure_at_warning_or_above_with_its_reason(seen: Seen) -> None:
    logs = eventually(
        lambda: seen.api.logs(seen.cohort["id"], min_level=30), "WARNING+ logs of the cohort run"
    )
    assert any(BROKEN in log["message"] and REASON in log["message"] for log in logs), [
        log["message"] for log in logs
    ]


# Names and tags -----------------------------------------------------------------------------


def test_the_cohort_run_is_named_from_its_time_and_size(seen: Seen) -> None:
    name = seen.cohort["name"]
    found = re.fullmatch(rf"cohort-(\d{{4}}-\d\d-\d\dT\d\d:\d\d)\S*-size{SIZE}", name)
    assert found, f"cohort run named {name!r}, not cohort-<YYYY-MM-DDTHH:MM>-size{SIZE}"
    named_at = datetime.fromisoformat(found.group(1))
    started = datetime.fromisoformat(seen.cohort["start_time"]).replace(tzinfo=None)
    assert abs(named_at - started) < timedelta(minutes=2), (name, seen.cohort["start_time"])


def test_app_runs_are_tagged_fleet_their_app_and_their_cohort_run(seen: Seen) -> None:
    cohort = seen.cohort
    for app_id, run in seen.apps.items():
        tags = set(run["tags"])
        assert {"fleet", f"app:{app_id}"} <= tags, (app_id, tags)
        assert any(cohort["name"] in t or cohort["id"] in t for t in tags), (app_id, tags)


def test_task_runs_are_named_stage_then_app_id(seen: Seen) -> None:
    for app_id, run in seen.apps.items():

        def through_learn(run_id: str = run["id"], last: str = f"learn-{app_id}") -> set[str]:
            names = {t["name"] for t in seen.api.task_runs(run_id)}
            return names if last in names else set()

        names = eventually(through_learn, f"task runs of {app_id} up to learn")
        assert f"dispatch-{app_id}" in names, names
        assert all(re.fullmatch(rf"[a-z]+(-[a-z]+)*-{re.escape(app_id)}", n) for n in names), names


# Artifacts ----------------------------------------------------------------------------------


def _artifacts(seen: Seen, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["key"]: a for a in seen.api.artifacts(run["id"]) if a["key"]}


def counted(text: str, word: str, n: int) -> bool:
    """`text` says `n` next to `word` ("1 failed", "1/2 done", "failed: 1", "done 1/2")."""
    near = rf"\b{n}(/\d+)?\W{{0,3}}(apps? )?{word}\b|\b{word}\W{{0,3}}{n}\b"
    return bool(re.search(near, text, flags=re.I))


def test_the_cohort_artifacts_count_done_and_failed_apart(seen: Seen) -> None:
    artifacts = _artifacts(seen, seen.cohort)
    assert {"fleet-cohort-progress", "fleet-cohort"} <= set(artifacts), sorted(artifacts)
    progress, table = artifacts["fleet-cohort-progress"], artifacts["fleet-cohort"]
    assert progress["type"] == "progress" and table["type"] == "table"
    rows = {r["app"]: r for r in json.loads(table["data"])}
    stages = {app: row["final stage"].split()[0] for app, row in rows.items()}
    assert stages == {OK: "complete", BROKEN: "failed"}, rows
    assert REASON in rows[BROKEN]["error"], rows[BROKEN]
    said = [a["description"] or "" for a in (progress, table)]
    assert any(counted(d, "done", 1) and counted(d, "failed", 1) for d in said), said


def test_the_failed_apps_summary_artifact_carries_its_error(seen: Seen) -> None:
    summary = _artifacts(seen, seen.apps[BROKEN]).get(f"app-{BROKEN}")
    assert summary is not None and REASON in summary["data"], summary


# Automations --------------------------------------------------------------------------------


def test_the_fleets_automations_are_installed_and_enabled(seen: Seen) -> None:
    found = {a["name"]: a for a in seen.api.automations()}
    assert set(ALERT_NAMES) <= set(found), sorted(found)
    assert all(found[name]["enabled"] for name in ALERT_NAMES)


# The browser --------------------------------------------------------------------------------


def test_the_browser_shows_the_cohort_run_failed_under_its_name(seen: Seen) -> None:
    page, state = seen.pages["cohort"], seen.cohort["state"]
    assert run_header(page.text, seen.cohort["name"])[1] == state["name"]
    assert state["type"] == "FAILED", state
    assert png_size(page.screenshot) == (1400, 900)
    assert page.screenshot.stat().st_size > 20_000  # a drawn page, not a blank one


def test_the_browser_shows_the_failed_app_run_its_tags_and_its_error(seen: Seen) -> None:
    page = seen.pages["app"]
    tags, state = run_header(page.text, f"evolve-{BROKEN}")
    assert state == "Failed"
    assert {"fleet", f"app:{BROKEN}"} <= set(tags), tags
    assert REASON in page.text
    assert png_size(page.screenshot) == (1400, 900)
    assert page.screenshot.stat().st_size > 20_000


def test_the_browser_lists_the_fleets_automations(seen: Seen) -> None:
    page = seen.pages["automations"]
    assert all(name in page.text for name in ALERT_NAMES), page.text[:1200]
