"""Feedback metabolism (DESIGN §5, seed 000's feedback.py) as pure functions of signals and a clock.

Five channels, each with a weight and a decay half-life; a signal is a value in [0, 1] where
1 is good (a crash_rate signal is 1 for a clean run, 0 for a crash). Then:

- grounded fitness = Σ weight × (decay-weighted mean of the channel's values), over the
  channels that have signals, renormalised by their weights; 0.5 (neutral) with none.
- metabolism = 0.4 freshness + 0.4 diversity + 0.2 volume, in [0, 1]: freshness is the mean
  over channels of the decay factor of its newest signal, diversity the share of channels
  with a signal younger than its half-life, volume the decayed signal count over `volume_target`.
- momentum = the least-squares slope of fitness per day over the last 14 days.
- pace: high metabolism → the short interval (30 s), low → the long one (300 s).

Mapping to this system's signals (`signals_from_events`, README "Feedback metabolism"):
build_health ← done/failed of hydra tasks (the quality gate), crash_rate ← pane deaths and
failed tasks (0) against finished ones (1), engagement ← tasks done (1) / failed (0) of every
kind, store_presence ← ship task outcomes, design_health ← review (adversarial) task outcomes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class Channel:
    name: str
    weight: float
    half_life_seconds: float


CHANNELS: tuple[Channel, ...] = (
    Channel("build_health", 0.25, 1 * HOUR),
    Channel("crash_rate", 0.20, 3 * DAY),
    Channel("engagement", 0.25, 6 * HOUR),
    Channel("store_presence", 0.15, 7 * DAY),
    Channel("design_health", 0.15, 4 * HOUR),
)
BY_NAME: Mapping[str, Channel] = {c.name: c for c in CHANNELS}
FRESHNESS, DIVERSITY, VOLUME = 0.4, 0.4, 0.2


@dataclass(frozen=True)
class Signal:
    channel: str
    at: datetime
    value: float  # in [0, 1], 1 = good


def decay(channel: Channel, age_seconds: float) -> float:
    """0.5 ** (age / half-life); a signal from the future counts as new."""
    return 0.5 ** (max(age_seconds, 0.0) / channel.half_life_seconds)


def _by_channel(signals: Iterable[Signal]) -> dict[str, list[Signal]]:
    out: dict[str, list[Signal]] = {}
    for s in signals:
        if s.channel not in BY_NAME:
            raise ValueError(f"unknown channel {s.channel!r}; one of {', '.join(BY_NAME)}")
        out.setdefault(s.channel, []).append(s)
    return out


def grounded_fitness(signals: Iterable[Signal], now: datetime) -> float:
    total = weight = 0.0
    for name, items in _by_channel(signals).items():
        ch = BY_NAME[name]
        ws = [decay(ch, (now - s.at).total_seconds()) for s in items]
        if sum(ws) <= 0:
            continue
        mean = sum(w * min(max(s.value, 0.0), 1.0) for w, s in zip(ws, items, strict=True)) / sum(
            ws
        )
        total += ch.weight * mean
        weight += ch.weight
    return total / weight if weight else 0.5


def metabolism(signals: Iterable[Signal], now: datetime, volume_target: float = 20.0) -> float:
    grouped = _by_channel(signals)
    fresh = diverse = 0.0
    volume = 0.0
    for ch in CHANNELS:
        items = grouped.get(ch.name, [])
        if not items:
            continue
        newest = min((now - s.at).total_seconds() for s in items)
        fresh += decay(ch, newest)
        diverse += 1.0 if newest <= ch.half_life_seconds else 0.0
        volume += sum(decay(ch, (now - s.at).total_seconds()) for s in items)
    n = len(CHANNELS)
    value = (
        FRESHNESS * fresh / n + DIVERSITY * diverse / n + VOLUME * min(volume / volume_target, 1.0)
    )
    return min(max(value, 0.0), 1.0)


def momentum(history: Sequence[tuple[datetime, float]], now: datetime, days: float = 14) -> float:
    """Least-squares slope of (time, fitness) over the last `days`, in fitness per day
    (0 with fewer than two points or no spread in time)."""
    start = now - timedelta(days=days)
    points = [((at - start).total_seconds() / DAY, y) for at, y in history if start <= at <= now]
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def pace(value: float, min_seconds: float = 30, max_seconds: float = 300) -> float:
    """High metabolism → short interval; linear between the bounds."""
    value = min(max(value, 0.0), 1.0)
    return max_seconds - value * (max_seconds - min_seconds)


_KIND_CHANNEL = {"hydra": "build_health", "ship": "store_presence", "review": "design_health"}


def signals_from_events(rows: Iterable[Mapping[str, Any]]) -> list[Signal]:
    """Signals from mesh_task_events rows (with task_type, as ImmuneStore.task_events_after)."""
    out: list[Signal] = []
    for r in rows:
        event, at = r["event"], r["at"]
        if event in ("done", "failed"):
            good = 1.0 if event == "done" else 0.0
            out.append(Signal("engagement", at, good))
            out.append(Signal("crash_rate", at, good))
            kind = (r.get("task_type") or "").split(":", 1)[0]
            if kind in _KIND_CHANNEL:
                out.append(Signal(_KIND_CHANNEL[kind], at, good))
        elif event == "PaneRespawned":
            out.append(Signal("crash_rate", at, 0.0))
    return out
