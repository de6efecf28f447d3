"""Feedback metabolism: channel weights and half-lives, fitness, metabolism, momentum, pace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fleet.mesh import metabolism as mb
from fleet.mesh.metabolism import Signal

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)


def test_channels_carry_the_design_numbers():
    assert {c.name: (c.weight, c.half_life_seconds / 3600) for c in mb.CHANNELS} == {
        "build_health": (0.25, 1),
        "crash_rate": (0.20, 72),
        "engagement": (0.25, 6),
        "store_presence": (0.15, 168),
        "design_health": (0.15, 4),
    }
    assert sum(c.weight for c in mb.CHANNELS) == pytest.approx(1.0)


def test_a_signal_one_half_life_old_counts_half():
    ch = mb.BY_NAME["build_health"]
    assert mb.decay(ch, 3600) == pytest.approx(0.5)
    assert mb.decay(ch, -5) == 1.0


def test_fitness_is_the_weighted_decayed_mean_and_neutral_without_signals():
    assert mb.grounded_fitness([], T0) == 0.5
    good = [Signal(c.name, T0, 1.0) for c in mb.CHANNELS]
    assert mb.grounded_fitness(good, T0) == pytest.approx(1.0)
    # A fresh failure outweighs an old success on the same channel.
    mixed = [Signal("build_health", T0 - 3 * H, 1.0), Signal("build_health", T0, 0.0)]
    assert mb.grounded_fitness(mixed, T0) == pytest.approx(1 / 9)


def test_metabolism_is_freshness_diversity_and_volume():
    assert mb.metabolism([], T0) == 0.0
    everything_now = [Signal(c.name, T0, 1.0) for c in mb.CHANNELS for _ in range(4)]
    assert mb.metabolism(everything_now, T0) == pytest.approx(1.0)
    one_channel = [Signal("engagement", T0, 1.0)]
    assert mb.metabolism(one_channel, T0) == pytest.approx(0.4 / 5 + 0.4 / 5 + 0.2 / 20)
    stale = [Signal("build_health", T0 - 10 * H, 1.0)]
    assert mb.metabolism(stale, T0) < mb.metabolism([Signal("build_health", T0, 1.0)], T0)


def test_momentum_is_the_14_day_slope_per_day():
    rising = [(T0 - timedelta(days=d), 0.5 - 0.01 * d) for d in range(10)]
    assert mb.momentum(rising, T0) == pytest.approx(0.01)
    old = [(T0 - timedelta(days=20), 0.0), (T0 - timedelta(days=1), 1.0)]
    assert mb.momentum(old, T0) == 0.0  # one point inside the window


def test_pace_runs_from_300_s_when_idle_to_30_s_when_busy():
    assert mb.pace(0.0) == 300 and mb.pace(1.0) == 30 and mb.pace(0.5) == 165
    assert mb.pace(7) == 30


def test_events_map_to_channels():
    rows = [
        {"event": "done", "at": T0, "task_type": "hydra:ab"},
        {"event": "failed", "at": T0, "task_type": "ship:cd"},
        {"event": "PaneRespawned", "at": T0, "task_type": None},
        {"event": "claimed", "at": T0, "task_type": "skill:x"},
    ]
    got = [(s.channel, s.value) for s in mb.signals_from_events(rows)]
    assert got == [
        ("engagement", 1.0),
        ("crash_rate", 1.0),
        ("build_health", 1.0),
        ("engagement", 0.0),
        ("crash_rate", 0.0),
        ("store_presence", 0.0),
        ("crash_rate", 0.0),
    ]


def test_an_unknown_channel_is_refused():
    with pytest.raises(ValueError, match="unknown channel"):
        mb.metabolism([Signal("vibes", T0, 1.0)], T0)


signals = st.lists(
    st.tuples(
        st.sampled_from([c.name for c in mb.CHANNELS]),
        st.integers(min_value=0, max_value=30 * 86400),
        st.floats(min_value=0, max_value=1),
    ),
    max_size=50,
)


@hsettings(max_examples=150, deadline=None)
@given(signals)
def test_fitness_and_metabolism_stay_in_bounds_and_pace_in_range(raw):
    sig = [Signal(c, T0 - timedelta(seconds=age), v) for c, age, v in raw]
    assert 0.0 <= mb.grounded_fitness(sig, T0) <= 1.0
    m = mb.metabolism(sig, T0)
    assert 0.0 <= m <= 1.0
    assert 30 <= mb.pace(m) <= 300
    # Time passing never makes the mesh look busier.
    assert mb.metabolism(sig, T0 + timedelta(hours=1)) <= m + 1e-9
