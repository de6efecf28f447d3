"""Run names and tags an operator finds runs by (pure: no Prefect)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from fleet.runview import app_run_tags, cohort_run_name, fleet_file_problem


def test_a_cohort_run_is_named_from_its_time_and_size():
    at = datetime(2026, 11, 30, 4, 0, 17, tzinfo=UTC)
    assert cohort_run_name(3, at) == "cohort-2026-11-30T04:00-size3"
    assert cohort_run_name(None, at) == "cohort-2026-11-30T04:00-progressive"


def test_the_name_is_in_utc_whatever_the_clock_zone():
    paris = timezone(timedelta(hours=1))
    assert cohort_run_name(10, datetime(2026, 11, 30, 5, 0, tzinfo=paris)).startswith(
        "cohort-2026-11-30T04:00"
    )


def test_an_app_run_is_tagged_with_the_fleet_its_app_and_its_cohort_run():
    assert app_run_tags("demo-calc", "cohort-2026-11-30T04:00-size3") == [
        "fleet",
        "app:demo-calc",
        "cohort:cohort-2026-11-30T04:00-size3",
    ]


def test_a_missing_fleet_file_is_refused_in_one_line(tmp_path):
    message = fleet_file_problem("/nonexistent.yaml", tmp_path)
    assert message is not None and "\n" not in message
    assert message.startswith("fleet_file: /nonexistent.yaml does not exist — ")
    relative = fleet_file_problem(".fleet/demo/fleet.yaml", tmp_path)
    assert relative is not None and f"(relative to {tmp_path})" in relative


def test_an_existing_or_empty_fleet_file_is_no_problem(tmp_path):
    (tmp_path / "fleet.yaml").write_text("apps: []\n")
    assert fleet_file_problem("fleet.yaml", tmp_path) is None
    assert fleet_file_problem(str(tmp_path / "fleet.yaml"), tmp_path) is None
    assert fleet_file_problem(None, tmp_path) is None
