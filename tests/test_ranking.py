"""KARL ranking for DISCOVER: pure."""

from __future__ import annotations

import pytest

from fleet.ranking import rank_apps, reward_for, select_cohort


def test_rank_by_reward_with_default_for_unknown_apps():
    ranked = rank_apps(["a", "b", "c", "d"], {"a": 0.2, "c": 0.9, "d": 0.5})
    assert ranked == ["c", "b", "d", "a"]  # b has no history → 0.5, ties keep fleet order


def test_rank_without_history_keeps_fleet_order():
    assert rank_apps(["z", "y", "x"], {}) == ["z", "y", "x"]


def test_select_cohort_is_top_n_never_everything_by_accident():
    ranked = [f"app{i}" for i in range(89)]
    assert select_cohort(ranked, 10) == ranked[:10]
    with pytest.raises(ValueError, match="at least 1"):
        select_cohort(ranked, 0)


def test_reward():
    assert reward_for("success", None) == 1.0
    assert reward_for("success", 0.7) == 0.7
    assert reward_for("success", 3.0) == 1.0
    assert reward_for("failure", 0.9) == 0.0
