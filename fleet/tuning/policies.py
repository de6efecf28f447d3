"""Versioned healing policies in the store: candidates, the active one, canary trials, rollback.

`apply` records a trial and which machines run the candidate (mesh_policy_assignments);
`policy_for(machine, …)` is the pure answer to "which thresholds does this machine run", and
`PoliciesInForce` (read once per cycle by `read_in_force`) is how the node agent, the
reconciler and the watchdog apply it: canary machines run the candidate, the others the active
policy, everyone the settings' values while no policy was applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr

from fleet.errors import ConfigError, FleetError
from fleet.mesh.rules import Thresholds
from fleet.sqlitedb import SQLiteFile
from fleet.store import queries
from fleet.store.pgconn import PgConnector
from fleet.tuning.genome import GENE_NAMES, settings_update

SQLITE_SCHEMA = Path(__file__).with_name("policies_sqlite.sql")
PG_QUERIES = queries.load("fleet.tuning", "queries.sql")
SQLITE_QUERIES = queries.load("fleet.tuning", "queries_sqlite.sql")
MAX_CANARY_SHARE = 0.5
MIN_TRIAL_SECONDS = 24 * 3600.0  # a canary runs a day before it is promoted
QUICK_RETURN_SECONDS = 600.0  # a machine back within this after "down" was not dead
log = logging.getLogger(__name__)
SettingsT = TypeVar("SettingsT", bound=BaseModel)


class PolicyError(FleetError):
    """A policy operation the state of the store refuses (one clear line for the operator)."""


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    genes: dict[str, float]
    status: str
    offerable: bool
    figures: dict[str, Any]
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class Trial:
    id: int
    candidate: int
    control: int | None
    share: float
    machines: tuple[str, ...]
    status: str
    started_by: str
    started_at: datetime
    decided_at: datetime | None = None
    decision: dict[str, Any] = field(default_factory=dict)


# Pure rules -----------------------------------------------------------------------------
def policy_for(machine_id: str, assignments: Mapping[str, int], active: int | None) -> int | None:
    """The policy version a machine runs: its canary assignment, else the active one
    (None: no policy applied yet — the settings model's values)."""
    return assignments.get(machine_id, active)


@dataclass(frozen=True)
class PoliciesInForce:
    """The policies machines run, as read once per cycle: the active version, the canary
    assignments and the genes of each. Empty (the default) = no policy applied: the settings'
    values everywhere."""

    active: int | None = None
    assignments: Mapping[str, int] = field(default_factory=dict)
    genes: Mapping[int, Mapping[str, float]] = field(default_factory=dict)

    def genes_for(self, machine_id: str | None = None) -> Mapping[str, float] | None:
        """The genes `machine_id` runs (None: the mesh-wide policy, the active one)."""
        version = (
            policy_for(machine_id, self.assignments, self.active) if machine_id else self.active
        )
        return self.genes.get(version) if version is not None else None

    def settings_for(self, settings: SettingsT, machine_id: str | None = None) -> SettingsT:
        """`settings` with the thresholds `machine_id` runs (unknown genes are ignored)."""
        genes = self.genes_for(machine_id)
        if not genes:
            return settings
        known = {k: v for k, v in genes.items() if k in GENE_NAMES}
        return settings.model_copy(update=settings_update(known))

    def reconcile_thresholds(self, settings: Any) -> tuple[Thresholds, dict[str, Thresholds]]:
        """The reconciler's thresholds: the mesh-wide policy's, and those of each canary
        machine whose own differ (rules.classify's `by_machine`)."""
        default = Thresholds.from_settings(self.settings_for(settings))
        own = {
            m: Thresholds.from_settings(self.settings_for(settings, m)) for m in self.assignments
        }
        return default, {m: t for m, t in own.items() if t != default}

    def liveness_by_machine(self, settings: Any) -> tuple[dict[str, float], dict[str, int]]:
        """Each canary machine's heartbeat interval and liveness confirmations (the watchdog's
        LivenessProbe judges its heartbeats by them)."""
        own = {m: self.settings_for(settings, m) for m in self.assignments}
        return (
            {m: float(s.heartbeat_seconds) for m, s in own.items()},
            {m: int(s.liveness_confirmations) for m, s in own.items()},
        )


def parse_share(text: str) -> float:
    """`20%`, `20` or `0.2` → 0.2; one clear error otherwise."""
    raw = text.strip().rstrip("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"--canary {text!r} is not a share — write e.g. 20%") from None
    share = value / 100 if text.strip().endswith("%") or value > 1 else value
    if not 0 < share <= MAX_CANARY_SHARE:
        raise ConfigError(
            f"--canary {text!r} must be more than 0% and at most "
            f"{MAX_CANARY_SHARE:.0%} of the machines (the rest are the control)"
        )
    return share


def pick_canary(machines: Sequence[str], share: float, salt: str) -> tuple[str, ...]:
    """ceil(share × machines) machines (at least one, never all), chosen by a stable hash, so
    the same trial picks the same machines wherever it is computed."""
    pool = sorted(set(machines))
    if len(pool) < 2:
        raise PolicyError(
            f"a canary needs at least two machines (one control); the mesh has {len(pool)}"
        )
    n = min(len(pool) - 1, max(1, math.ceil(share * len(pool))))
    ranked = sorted(pool, key=lambda m: hashlib.sha1(f"{salt}:{m}".encode()).hexdigest())
    return tuple(sorted(ranked[:n]))


@dataclass(frozen=True)
class LiveFigures:
    machines: int
    days: float
    requeues: int
    false_positives: int  # requeued work that showed progress after, machines back quickly
    mttr: float  # mean seconds from the last sign of life to the requeue

    @property
    def fp_rate(self) -> float:
        return self.false_positives / max(self.machines * self.days, 1e-9)


def live_figures(
    events: Iterable[Mapping[str, Any]], machines: Iterable[str], since: datetime, now: datetime
) -> LiveFigures:
    """Healing figures of a group of machines from mesh_task_events since `since`.

    Live there are no labels, so a false positive is what proves itself one: a requeued task
    whose pane reported progress afterwards, or a machine declared down that heartbeated again
    within QUICK_RETURN_SECONDS.
    """
    from fleet.tuning.history import REQUEUE_REASONS  # with numpy: only when trials are judged

    group = set(machines)
    last_life: dict[str, datetime] = {}
    requeued: dict[str, tuple[str, datetime]] = {}
    downs: dict[str, datetime] = {}
    detect: list[float] = []
    fps = requeues = 0
    for e in events:
        at = _aware(e["at"])
        machine, task, event = e.get("machine_id"), e.get("task_id"), e["event"]
        if at < since or machine not in group:
            continue
        reason = str((e.get("detail") or {}).get("reason") or "")
        if task and event in ("claimed", "injected", "running", "Progress"):
            if event == "Progress" and task in requeued and requeued[task][0] == machine:
                fps += 1
                requeued.pop(task)
            last_life[task] = at
        elif task and event in ("queued", "dead_letter") and reason in REQUEUE_REASONS:
            requeues += 1
            requeued[task] = (machine or "", at)
            if task in last_life:
                detect.append((at - last_life[task]).total_seconds())
        elif event == "MachineDown" and machine:
            downs[machine] = at
        elif (
            event == "MachineUp"
            and machine in downs
            and (at - downs.pop(machine)).total_seconds() <= QUICK_RETURN_SECONDS
        ):
            fps += 1
    days = max((now - since).total_seconds() / 86400, 0.0)
    return LiveFigures(
        len(group), days, requeues, fps, sum(detect) / len(detect) if detect else 0.0
    )


def decide(
    canary: LiveFigures,
    control: LiveFigures,
    age_seconds: float,
    min_seconds: float = MIN_TRIAL_SECONDS,
) -> tuple[str, str]:
    """("rollback" | "promote" | "wait", why). A false-positive regression rolls back at once."""
    if canary.false_positives and canary.fp_rate > control.fp_rate:
        return "rollback", (
            f"false positives regressed: {canary.fp_rate:.2f} vs "
            f"{control.fp_rate:.2f} per machine-day on the control"
        )
    if age_seconds < min_seconds:
        return "wait", (
            f"trial {age_seconds / 3600:.1f} h old; decides after {min_seconds / 3600:.0f} h"
        )
    if canary.requeues and control.requeues and canary.mttr > control.mttr:
        return "rollback", f"MTTR regressed: {canary.mttr:.0f} s vs {control.mttr:.0f} s"
    return "promote", (
        f"no false-positive regression ({canary.fp_rate:.2f} vs "
        f"{control.fp_rate:.2f}/machine-day), MTTR {canary.mttr:.0f} s vs "
        f"{control.mttr:.0f} s"
    )


def _aware(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# The store ------------------------------------------------------------------------------
# `run("query_name", param=value, …)`: one named query of the backend's file, its rows.
Run = Callable[..., list[dict[str, Any]]]


class PolicyStore:
    """The policy tables on one backend (SQLite or PostgreSQL), through the named queries of
    fleet/tuning/queries.sql and queries_sqlite.sql."""

    def _session(self) -> Any: ...  # a context manager yielding a Run, in one transaction
    def _json(self, value: Any) -> Any:
        return json.dumps(value)

    def _time(self, value: datetime) -> Any:
        return value

    def close(self) -> None: ...

    # Reading --------------------------------------------------------------------------
    def versions(self) -> list[PolicyVersion]:
        with self._session() as run:
            return [_version(r) for r in run("versions")]

    def get(self, version: int) -> PolicyVersion:
        with self._session() as run:
            rows = run("policy", version=version)
        if not rows:
            raise PolicyError(
                f"no policy version {version} — `fleet ga evolve` proposes them, "
                "`fleet ga policies` lists them"
            )
        return _version(rows[0])

    def active(self) -> PolicyVersion | None:
        with self._session() as run:
            rows = run("active")
        return _version(rows[0]) if rows else None

    def trials(self) -> list[Trial]:
        with self._session() as run:
            return [_trial(r) for r in run("trials")]

    def running_trial(self) -> Trial | None:
        return next((t for t in self.trials() if t.status == "running"), None)

    def assignments(self) -> dict[str, int]:
        with self._session() as run:
            return {r["machine_id"]: int(r["version"]) for r in run("assignments")}

    def in_force(self) -> PoliciesInForce:
        """What every machine runs now, in one transaction."""
        with self._session() as run:
            active = run("active")
            assignments = {r["machine_id"]: int(r["version"]) for r in run("assignments")}
            wanted = set(assignments.values()) | {int(r["version"]) for r in active}
            genes = {v: _version(r).genes for v in sorted(wanted) for r in run("policy", version=v)}
        return PoliciesInForce(int(active[0]["version"]) if active else None, assignments, genes)

    def log(self) -> list[dict[str, Any]]:
        with self._session() as run:
            return [{**r, "detail": _loads(r["detail"])} for r in run("log")]

    # Writing --------------------------------------------------------------------------
    def propose(
        self,
        genes: Mapping[str, float],
        *,
        offerable: bool,
        figures: Mapping[str, Any],
        by: str,
        now: datetime,
    ) -> int:
        """Record a candidate the optimizer found; returns its version."""
        with self._session() as run:
            return self._insert(run, genes, "candidate", offerable, figures, by, now)

    def _insert(
        self,
        run: Run,
        genes: Mapping[str, float],
        status: str,
        offerable: bool,
        figures: Mapping[str, Any],
        by: str,
        now: datetime,
    ) -> int:
        rows = run(
            "insert_policy",
            genes=self._json(dict(genes)),
            status=status,
            offerable=offerable,
            figures=self._json(dict(figures)),
            created_by=by,
            now=self._time(now),
        )
        return int(rows[0]["version"])

    def _log(
        self, run: Run, version: int, action: str, by: str, now: datetime, detail: Mapping[str, Any]
    ) -> None:
        run(
            "append_log",
            version=version,
            action=action,
            by_whom=by,
            now=self._time(now),
            detail=self._json(dict(detail)),
        )

    def start_trial(
        self,
        candidate: int,
        machines: Sequence[str],
        share: float,
        *,
        baseline: Mapping[str, float],
        by: str,
        now: datetime,
    ) -> Trial:
        """Run `candidate` on a share of `machines`; the rest stay on the active policy (the
        settings' values, recorded as the baseline version, when none was applied yet)."""
        cand = self.get(candidate)
        if not cand.offerable:
            raise PolicyError(
                f"policy {candidate} failed the guard rail (it adds false positives "
                "on a labelled history) and is never applied"
            )
        if cand.status != "candidate":
            raise PolicyError(
                f"policy {candidate} is {cand.status}; only a candidate can go to canary"
            )
        if self.running_trial() is not None:
            raise PolicyError(
                "a canary trial is already running — `fleet ga trials` decides it, "
                "`fleet ga rollback` ends it"
            )
        with self._session() as run:
            rows = run("active")
            if rows:
                control = int(rows[0]["version"])
            else:
                control = self._insert(
                    run, baseline, "active", True, {"source": "settings"}, by, now
                )
                self._log(run, control, "baseline", by, now, {"reason": "settings in force"})
            chosen = pick_canary(machines, share, salt=f"policy-{candidate}")
            rows = run(
                "insert_trial",
                candidate=candidate,
                control=control,
                share=share,
                machines=self._json(list(chosen)),
                started_by=by,
                now=self._time(now),
            )
            trial_id = int(rows[0]["id"])
            for m in chosen:
                run(
                    "assign",
                    machine_id=m,
                    version=candidate,
                    trial_id=trial_id,
                    now=self._time(now),
                )
            run("set_status", status="canary", version=candidate)
            self._log(
                run,
                candidate,
                "canary",
                by,
                now,
                {"trial": trial_id, "share": share, "machines": list(chosen)},
            )
        trial = self.running_trial()
        assert trial is not None
        return trial

    def promote(
        self, trial_id: int, *, by: str, now: datetime, decision: Mapping[str, Any]
    ) -> None:
        trial = self._trial(trial_id)
        with self._session() as run:
            run("retire_active")
            run("set_status", status="active", version=trial.candidate)
            self._end_trial(run, trial, "promoted", now, decision)
            self._log(run, trial.candidate, "promote", by, now, {"trial": trial.id, **decision})

    def rollback(self, *, by: str, now: datetime, reason: str = "operator") -> int:
        """End the running trial (its machines go back to the control), else return to the
        policy active before the current one. Returns the version now in force everywhere."""
        trial = self.running_trial()
        with self._session() as run:
            if trial is not None:
                run("set_status", status="rolled_back", version=trial.candidate)
                self._end_trial(run, trial, "rolled_back", now, {"reason": reason})
                self._log(
                    run, trial.candidate, "rollback", by, now, {"trial": trial.id, "reason": reason}
                )
                return int(trial.control) if trial.control is not None else 0
            entries = run("activations")
            rows = run("active")
            if not rows:
                raise PolicyError("no policy has been applied: nothing to roll back")
            current = int(rows[0]["version"])
            gone = {int(r["version"]) for r in run("rolled_back_versions")}
            # The last policy activated before this one that was not itself rolled back.
            previous = [
                int(e["version"])
                for e in entries
                if int(e["version"]) != current and int(e["version"]) not in gone
            ]
            if not previous:
                raise PolicyError(
                    f"policy {current} is the first applied (the settings baseline): "
                    "nothing before it to roll back to"
                )
            back = previous[-1]
            run("set_status", status="rolled_back", version=current)
            run("set_status", status="active", version=back)
            self._log(run, back, "rollback", by, now, {"from": current, "reason": reason})
            return back

    def _trial(self, trial_id: int) -> Trial:
        trial = next((t for t in self.trials() if t.id == trial_id), None)
        if trial is None or trial.status != "running":
            raise PolicyError(f"trial {trial_id} is not running")
        return trial

    def _end_trial(
        self, run: Run, trial: Trial, status: str, now: datetime, decision: Mapping[str, Any]
    ) -> None:
        run("unassign_trial", trial_id=trial.id)
        run(
            "end_trial",
            status=status,
            now=self._time(now),
            decision=self._json(dict(decision)),
            trial_id=trial.id,
        )


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _version(r: Mapping[str, Any]) -> PolicyVersion:
    return PolicyVersion(
        int(r["version"]),
        {k: float(v) for k, v in _loads(r["genes"]).items()},
        r["status"],
        bool(r["offerable"]),
        _loads(r["figures"]),
        r["created_by"],
        _aware(r["created_at"]),
    )


def _trial(r: Mapping[str, Any]) -> Trial:
    return Trial(
        int(r["id"]),
        int(r["candidate"]),
        int(r["control"]) if r["control"] is not None else None,
        float(r["share"]),
        tuple(_loads(r["machines"])),
        r["status"],
        r["started_by"],
        _aware(r["started_at"]),
        _aware(r["decided_at"]) if r["decided_at"] is not None else None,
        _loads(r["decision"]),
    )


class SQLitePolicyStore(SQLiteFile, PolicyStore):
    what = "SQLite policy store"

    def __init__(self, path: str | Path):
        SQLiteFile.__init__(self, path, SQLITE_SCHEMA.read_text())

    def _time(self, value: datetime) -> Any:
        return value.astimezone(UTC).isoformat()

    @contextmanager
    def _session(self) -> Iterator[Run]:
        with self._tx() as conn:

            def run(query: str, /, **params: Any) -> list[dict[str, Any]]:
                return [dict(r) for r in conn.execute(SQLITE_QUERIES[query], params).fetchall()]

            try:
                yield run
            except sqlite3.IntegrityError as exc:
                raise PolicyError(f"policy store refused the change: {exc}") from exc


class PgPolicyStore(PolicyStore):
    """On PostgreSQL through the shared connector: applies the migrations (0005_policies.sql
    among them) on first use."""

    def __init__(self, conninfo: str | SecretStr):
        self._db = PgConnector(
            conninfo,
            label="PostgreSQL policy store",
            advice="check the server is up and FLEET_STORE_URL points at it",
            application_name="fleet-policies",
        )
        self._migrated = False

    def __repr__(self) -> str:
        return f"PgPolicyStore({self._db.where!r})"

    def _json(self, value: Any) -> Any:
        from psycopg.types.json import Jsonb

        return Jsonb(value)

    def _migrate(self) -> None:
        import psycopg

        from fleet.store.migrations import apply_migrations

        if self._migrated:
            return
        try:
            apply_migrations(self._db.conninfo.get_secret_value())
        except psycopg.Error as exc:
            # `from None`: the driver's error may quote the connection string.
            raise self._db.unavailable(
                "cannot apply the migrations",
                exc,
                unreachable=isinstance(exc, psycopg.OperationalError),
            ) from None
        self._migrated = True

    @contextmanager
    def _session(self) -> Iterator[Run]:
        import psycopg

        self._migrate()
        with self._db.transaction() as conn:

            def run(query: str, /, **params: Any) -> list[dict[str, Any]]:
                try:
                    cur = conn.execute(PG_QUERIES[query], params)
                except psycopg.errors.IntegrityError as exc:
                    # A refusal of the store's rules (one active policy, one running trial),
                    # not an outage; the transaction rolls back on the way out.
                    raise PolicyError(
                        f"policy store refused the change: {exc}".splitlines()[0]
                    ) from None
                return cur.fetchall() if cur.description else []

            yield run

    def close(self) -> None:
        self._db.close()


def open_policy_store(url: str) -> PolicyStore:
    """The policy tables beside the mesh store named by `url` (sqlite:///… or postgresql://…)."""
    if url.startswith("sqlite:///"):
        return SQLitePolicyStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        return PgPolicyStore(url)
    scheme = url.split(":")[0]
    raise ConfigError(f"the policy store needs sqlite:///… or postgresql://…, not {scheme!r}")


def policy_store_beside(mesh: Any) -> PolicyStore | None:
    """The policy tables in the mesh store's own database (a SQLite file's path or a
    PostgreSQL store's conninfo); None for a store with neither, or one that cannot be
    opened (logged: healing goes on with the settings' values)."""
    path = getattr(mesh, "path", None)
    conninfo = getattr(mesh, "conninfo", None)
    try:
        if isinstance(path, Path):
            return SQLitePolicyStore(path)
        if isinstance(conninfo, SecretStr):
            return PgPolicyStore(conninfo)
    except FleetError as exc:
        log.warning("healing policies unavailable beside %r: %s", mesh, exc)
    return None


def read_in_force(
    store: PolicyStore | None, fallback: PoliciesInForce | None = None
) -> PoliciesInForce:
    """What every machine runs, from `store`; when it cannot say (no store, an outage),
    `fallback` — the last answer read, else the settings' values. Healing never stops for
    want of a policy."""
    if store is None:
        return fallback or PoliciesInForce()
    try:
        return store.in_force()
    except FleetError as exc:
        log.warning("healing policies unreadable, keeping the last known: %s", exc)
        return fallback or PoliciesInForce()
