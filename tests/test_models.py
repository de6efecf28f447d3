"""App ids, stage transitions, task identity and settings: pure, no Prefect."""

from __future__ import annotations

import itertools
import os

import pytest
from pydantic import ValidationError

from fleet.errors import InvalidAppId, InvalidTransition
from fleet.models import Stage, Task, check_transition, validate_app_id
from fleet.settings import FleetSettings


@pytest.mark.parametrize("good", ["a", "demo-calc", "app.v2_beta", "0lead", "x" * 64])
def test_valid_app_ids(good):
    assert validate_app_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "A",
        "app;rm -rf /",
        "$(touch pwned)",
        "a b",
        "-lead",
        ".hidden",
        "x" * 65,
        "app\n",
        "ápp",
        "../etc",
        "a|b",
        "a`b`",
        None,
        7,
    ],
)
def test_hostile_app_ids_are_refused_with_the_rule(bad):
    with pytest.raises(InvalidAppId) as err:
        validate_app_id(bad)
    assert "[a-z0-9._-]" in str(err.value) and "1–64" in str(err.value)


def test_task_with_bad_app_id_fails_validation():
    with pytest.raises(ValidationError, match="app ids are"):
        Task(app_id="app;reboot", description="x")


def test_stage_order_and_terminal():
    assert Stage.QUEUED.before(Stage.SKILL_COMPLETE)
    assert not Stage.ADVERSARIAL_COMPLETE.before(Stage.SKILL_COMPLETE)
    assert Stage.HYDRA_BUILD.before(Stage.COMPLETE)
    assert Stage.FAILED.terminal and Stage.COMPLETE.terminal and not Stage.HYDRA_BUILD.terminal


def test_transitions_follow_the_pipeline():
    path = [
        Stage.QUEUED,
        Stage.SKILL_RUNNING,
        Stage.SKILL_COMPLETE,
        Stage.ADVERSARIAL_RUNNING,
        Stage.ADVERSARIAL_COMPLETE,
        Stage.HYDRA_BUILD,
        Stage.COMPLETE,
        Stage.QUEUED,
    ]
    for current, new in itertools.pairwise(path):
        check_transition(current, new)
    with pytest.raises(InvalidTransition, match="skillComplete cannot move to complete"):
        check_transition(Stage.SKILL_COMPLETE, Stage.COMPLETE)
    with pytest.raises(InvalidTransition):
        check_transition(Stage.SKILL_COMPLETE, Stage.HYDRA_BUILD)  # review is never skipped


def test_task_key_is_stable_and_ignores_case_and_spacing():
    a = Task(app_id="a", description="Fix  the\ncrash.", file="App.swift", priority=1)
    b = Task(app_id="a", description="fix the crash.", file="app.swift", priority=5)
    c = Task(
        app_id="a",
        description="fix the crash.",
        file="app.swift",
        source="adversarial",
        severity="low",
    )
    assert a.key == b.key != c.key
    assert a.description == "Fix the crash."


def test_task_priority_bounds():
    with pytest.raises(ValidationError):
        Task(app_id="a", description="x", priority=6)
    with pytest.raises(ValidationError):
        Task(app_id="a", description="   ")


def test_settings_defaults_match_the_design(monkeypatch):
    for name in [n for n in os.environ if n.startswith("FLEET_")]:
        monkeypatch.delenv(name)  # the suite speeds some of them up in conftest
    s = FleetSettings()
    assert (s.skill_timeout_seconds, s.review_timeout_seconds) == (3600, 1800)
    assert (s.hydra_poll_seconds, s.hydra_hard_stop_seconds) == (300, 14400)
    assert s.task_floor == 3 and s.default_reward == 0.5
    assert [s.cohort_size(n) for n in range(4)] == [10, 20, 40, 40]
    assert (s.orphan_claim_seconds, s.stuck_injection_seconds, s.task_expiry_seconds) == (
        600,
        900,
        86400,
    )


def test_settings_are_overridable_by_env(monkeypatch):
    monkeypatch.setenv("FLEET_MAX_CONCURRENT", "9")
    monkeypatch.setenv("FLEET_COHORT_SIZES", "[2, 4]")
    monkeypatch.setenv("GEMINI_API_KEY", "sk-test-secret")
    s = FleetSettings()
    assert s.max_concurrent == 9 and s.cohort_size(5) == 4
    assert (
        "sk-test-secret" not in repr(s) and s.gemini_api_key.get_secret_value() == "sk-test-secret"
    )
