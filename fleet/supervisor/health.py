"""Health limits of a process tree (memory, CPU via psutil), sampled by the injected clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import psutil

from fleet.supervisor.config import Health


@dataclass(frozen=True)
class Reading:
    memory_mb: float
    cpu_percent: float
    processes: int


@dataclass(frozen=True)
class HealthSample:
    at: datetime
    memory_mb: float
    cpu_percent: float
    processes: int

    def as_dict(self) -> dict:
        return {
            "at": self.at.isoformat(),
            "memory_mb": round(self.memory_mb, 1),
            "cpu_percent": round(self.cpu_percent, 1),
            "processes": self.processes,
        }


Reader = Callable[[int], "Reading | None"]  # pid → a reading of its tree (None: it is gone)


class TreeReader:
    """psutil readings of a process and its descendants (memory summed, CPU summed)."""

    def __init__(self) -> None:
        self._known: dict[
            int, psutil.Process
        ] = {}  # the same objects across samples give a cpu delta

    def __call__(self, pid: int) -> Reading | None:
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        rss = cpu = 0.0
        seen: dict[int, psutil.Process] = {}
        for m in members:
            known = self._known.get(m.pid, m)
            try:
                rss += known.memory_info().rss
                cpu += known.cpu_percent(interval=None)
            except psutil.Error:
                continue
            seen[m.pid] = known
        self._known = seen
        return Reading(rss / (1024 * 1024), cpu, len(seen))


class HealthMonitor:
    """Samples one process tree every `interval_seconds`; `check` says why it breaches a limit."""

    def __init__(self, health: Health, read: Reader | None = None):
        self.health = health
        self._injected = read
        self.read: Reader = read or TreeReader()
        self.next_at: datetime | None = None
        self.cpu_over = 0
        self.last_sample: HealthSample | None = None

    def start(self, now: datetime) -> None:
        """A new run of the process: the first sample is one interval away, counters reset."""
        self.next_at = now + timedelta(seconds=self.health.interval_seconds)
        self.cpu_over = 0
        self.read = self._injected or TreeReader()

    def check(self, pid: int, now: datetime) -> str | None:
        """Sample if one is due; returns why the tree breaches a limit, if it does."""
        if self.next_at is None or now < self.next_at:
            return None
        self.next_at = now + timedelta(seconds=self.health.interval_seconds)
        reading = self.read(pid)
        if reading is None:
            return None
        sample = HealthSample(now, reading.memory_mb, reading.cpu_percent, reading.processes)
        self.last_sample = sample
        health = self.health
        if health.max_memory_mb is not None and sample.memory_mb > health.max_memory_mb:
            return f"memory {sample.memory_mb:.0f} MB over the limit of {health.max_memory_mb:g} MB"
        if health.max_cpu_percent is not None:
            self.cpu_over = self.cpu_over + 1 if sample.cpu_percent > health.max_cpu_percent else 0
            if self.cpu_over >= health.cpu_samples:
                return (
                    f"cpu {sample.cpu_percent:.0f}% over the limit of {health.max_cpu_percent:g}% "
                    f"for {self.cpu_over} samples"
                )
        return None
