"""Supabase REST backend of the Store (supabase-py → PostgREST), for operators with only the
project URL and its service key.

Claims, fenced stage writes, resets and reward means go through the SQL functions of
supabase/migrations (`/rest/v1/rpc/<fn>`), so they are exactly as atomic as on a direct
PostgreSQL connection. supabase-py retries only GET/HEAD, so every write here is safe to
repeat by construction: inserts are upserts on the table's key (`on_conflict=…`), updates
are conditional PATCHes (`epoch=eq.N`, `finished_at=is.null`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import SecretStr

from fleet.clients.transport import is_loopback
from fleet.errors import ConfigError, StoreUnavailable
from fleet.models import EvolutionState, FleetConfig, Stage, Task, Trajectory
from fleet.store.base import Effect, EffectKind, Lease, TotalsBy, WorkEntry, WorkTotal, task_row
from fleet.store.refusals import REFUSAL_SQLSTATE, StoreUnreachable, refusal, unreachable_code
from fleet.store.timestamps import utc

T = TypeVar("T")

# PostgREST / PostgreSQL codes that mean the key lacks rights, not that the server is down.
_AUTH_CODES = {"PGRST301", "PGRST302", "PGRST303", "42501", "401", "403"}
_UPSERT_CHUNK = 500  # rows per request: keeps bodies well under PostgREST's limits


def _iso(value: datetime) -> str:
    return utc(value).isoformat()


def _scalar(value: Any) -> Any:
    # PostgREST answers a NULL scalar with `null`; an empty body means the same.
    return None if value in (None, [], "") else value


class SupabaseStore:
    """Store over Supabase's REST API; needs the project URL and its service_role key."""

    def __init__(
        self,
        url: str,
        service_key: str | SecretStr,
        *,
        timeout_seconds: float = 30,
        allow_insecure: bool = False,
        page_size: int = 1000,
    ):
        import httpx
        from supabase.lib.client_options import SyncClientOptions

        from supabase import create_client

        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(
                f"Supabase URL must look like https://<project-ref>.supabase.co, got a "
                f"{parts.scheme or 'schemeless'} URL (FLEET_SUPABASE_URL)"
            )
        if parts.scheme == "http" and not (allow_insecure or is_loopback(parts.hostname)):
            raise ConfigError(
                f"refusing plain http:// to {parts.hostname}: the service key would travel "
                "unencrypted — use https://, or set FLEET_ALLOW_INSECURE_TRANSPORT=true"
            )
        key = service_key if isinstance(service_key, SecretStr) else SecretStr(service_key)
        if not key.get_secret_value():
            raise ConfigError("Supabase service key is empty — set FLEET_SUPABASE_KEY")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._key = key
        # PostgREST caps each response at `max_rows` (1000 on Supabase): reads page at
        # `page_size`, which must not exceed it.
        self._page = page_size
        # Our own HTTP client: one timeout for every call, and no redirects (a redirect
        # elsewhere would carry the key's headers along).
        self._http = httpx.Client(timeout=timeout_seconds, follow_redirects=False)
        options = SyncClientOptions(
            httpx_client=self._http, auto_refresh_token=False, persist_session=False
        )
        self._client = create_client(self.url, key.get_secret_value(), options)

    def __repr__(self) -> str:
        return f"SupabaseStore({self.url!r})"

    # Error mapping ---------------------------------------------------------------
    def _clean(self, text: object) -> str:
        return str(text).replace(self._key.get_secret_value(), "***")

    def _call(self, what: str, request: Callable[[], T]) -> T:
        import httpx
        from postgrest.exceptions import APIError

        try:
            return request()
        except APIError as exc:
            raise self._refusal(what, exc) from None
        except httpx.HTTPError as exc:
            raise StoreUnreachable(
                f"Supabase at {self.url}: {what} failed: {type(exc).__name__}: "
                f"{self._clean(exc) or 'no response'} — check the network and FLEET_SUPABASE_URL"
            ) from None

    def _refusal(self, what: str, exc: Any) -> Exception:
        message = self._clean(exc.message or "")
        if exc.code == REFUSAL_SQLSTATE:
            refused = refusal(message)
            if refused is not None:
                return refused
        code = exc.code or "?"
        if code in _AUTH_CODES:
            advice = "use the project's service_role key (FLEET_SUPABASE_KEY), not the anon key"
        elif code.startswith("PGRST2") or code in ("42P01", "42883"):
            advice = "apply supabase/migrations to the project (`supabase db push`)"
        else:
            advice = "the store is unavailable or refused the request; retry later"
        details = f" ({self._clean(exc.details)})" if exc.details else ""
        error = StoreUnreachable if unreachable_code(exc.code) else StoreUnavailable
        return error(f"Supabase at {self.url}: {what} failed: {code} {message}{details} — {advice}")

    # Request helpers -------------------------------------------------------------
    def _table(self, name: str) -> Any:
        return self._client.table(name)

    def _upsert(
        self, what: str, table: str, rows: Any, *, select: str | None = None, **options: Any
    ) -> Any:
        """One upsert request; with `select`, the response lists those columns of the rows
        it wrote."""

        def request() -> Any:
            query = self._table(table).upsert(rows, **options)
            return (query.select(select) if select else query).execute()

        return self._call(what, request)

    def _rpc(self, fn: str, params: dict[str, Any]) -> Any:
        return self._call(f"rpc {fn}", lambda: self._client.rpc(fn, params).execute()).data

    def _rpc_epoch(self, fn: str, params: dict[str, Any]) -> int | None:
        """A function's epoch answer, or None (refused)."""
        epoch = _scalar(self._rpc(fn, params))
        return int(epoch) if epoch is not None else None

    def _rpc_flag(self, fn: str, params: dict[str, Any]) -> bool:
        """A function's boolean answer (NULL and an empty body are False)."""
        return bool(_scalar(self._rpc(fn, params)))

    def _select_all(self, what: str, build: Callable[[], Any]) -> list[dict[str, Any]]:
        """Every row of a select, page by page (`build()` returns a fresh, ordered query)."""
        rows: list[dict[str, Any]] = []
        while True:
            page = self._call(
                what, lambda: build().limit(self._page).offset(len(rows)).execute()
            ).data
            rows.extend(page)
            if len(page) < self._page:
                return rows

    # App states and claims -------------------------------------------------------
    def ensure_apps(self, app_ids: Iterable[str], now: datetime) -> None:
        from postgrest.types import ReturnMethod

        rows = [{"app_id": a, "updated_at": _iso(now)} for a in dict.fromkeys(app_ids)]
        for i in range(0, len(rows), _UPSERT_CHUNK):
            chunk = rows[i : i + _UPSERT_CHUNK]
            self._upsert(
                "ensure_apps",
                "app_evolution_states",
                chunk,
                on_conflict="app_id",
                ignore_duplicates=True,
                returning=ReturnMethod.minimal,
            )

    def get_state(self, app_id: str) -> EvolutionState | None:
        rows = self._call(
            "get_state",
            lambda: self._table("app_evolution_states").select("*").eq("app_id", app_id).execute(),
        ).data
        return EvolutionState.model_validate(rows[0]) if rows else None

    def list_states(self) -> list[EvolutionState]:
        rows = self._select_all(
            "list_states", lambda: self._table("app_evolution_states").select("*").order("app_id")
        )
        return [EvolutionState.model_validate(r) for r in rows]

    def claim_app(
        self,
        app_id: str,
        owner: str,
        run_id: str,
        now: datetime,
        lease_seconds: float,
        steal_from: str | None = None,
        max_in_flight: int | None = None,
    ) -> int | None:
        return self._rpc_epoch(
            "fleet_claim_app",
            {
                "p_app_id": app_id,
                "p_owner": owner,
                "p_run_id": run_id,
                "p_now": _iso(now),
                "p_lease_seconds": float(lease_seconds),
                "p_steal_from": steal_from,
                "p_max_in_flight": max_in_flight,
            },
        )

    def release_app(self, app_id: str, epoch: int) -> None:
        from postgrest.types import ReturnMethod

        self._call(
            "release_app",
            lambda: (
                self._table("app_evolution_states")
                .update({"owner": None, "lease_until": None}, returning=ReturnMethod.minimal)
                .eq("app_id", app_id)
                .eq("epoch", epoch)
                .execute()
            ),
        )

    def set_stage(
        self,
        app_id: str,
        stage: Stage,
        epoch: int,
        now: datetime,
        error: str | None = None,
        lease_seconds: float | None = None,
    ) -> EvolutionState:
        row = self._rpc(
            "fleet_set_stage",
            {
                "p_app_id": app_id,
                "p_stage": Stage(stage).value,
                "p_epoch": epoch,
                "p_now": _iso(now),
                "p_error": error,
                "p_lease_seconds": float(lease_seconds) if lease_seconds else None,
            },
        )
        if isinstance(row, list):  # a proxy or an older PostgREST may wrap the row
            row = row[0]
        return EvolutionState.model_validate(row)

    def renew_claim(self, app_id: str, epoch: int, now: datetime, lease_seconds: float) -> bool:
        return self._rpc_flag(
            "fleet_renew_claim",
            {
                "p_app_id": app_id,
                "p_epoch": epoch,
                "p_now": _iso(now),
                "p_lease_seconds": float(lease_seconds),
            },
        )

    def reset_app(self, app_id: str, now: datetime) -> None:
        self._rpc("fleet_reset_app", {"p_app_id": app_id, "p_now": _iso(now)})

    # Effects ledger --------------------------------------------------------------
    def record_effect(
        self, app_id: str, key: str, kind: EffectKind, value: str, epoch: int, now: datetime
    ) -> str:
        stored = self._rpc(
            "fleet_record_effect",
            {
                "p_app_id": app_id,
                "p_key": key,
                "p_kind": kind,
                "p_value": value,
                "p_epoch": epoch,
                "p_now": _iso(now),
            },
        )
        return str(stored)

    def get_effect(self, app_id: str, key: str) -> Effect | None:
        rows = self._call(
            "get_effect",
            lambda: (
                self._table("app_effects").select("*").eq("app_id", app_id).eq("key", key).execute()
            ),
        ).data
        return Effect.model_validate(rows[0]) if rows else None

    def list_effects(self, app_id: str) -> list[Effect]:
        rows = self._select_all(
            "list_effects",
            lambda: (
                self._table("app_effects")
                .select("*")
                .eq("app_id", app_id)
                .order("created_at")
                .order("key")
            ),
        )
        return [Effect.model_validate(r) for r in rows]

    # Tasks -----------------------------------------------------------------------
    def upsert_tasks(self, tasks: Iterable[Task], now: datetime) -> int:
        from postgrest.types import ReturnMethod

        by_key = {t.key: t for t in tasks}
        rows = [task_row(t) | {"updated_at": _iso(now)} for t in by_key.values()]
        new = 0
        for i in range(0, len(rows), _UPSERT_CHUNK):
            chunk = rows[i : i + _UPSERT_CHUNK]
            # 1. Insert the keys not stored yet; the response lists exactly those.
            inserted = self._upsert(
                "upsert_tasks",
                "app_evolution_tasks",
                [{**r, "created_at": r["updated_at"]} for r in chunk],
                on_conflict="task_key",
                ignore_duplicates=True,
                select="task_key",
            ).data
            fresh = {r["task_key"] for r in inserted}
            new += len(fresh)
            # 2. Refresh priority and severity of the keys that were already there.
            known = [r for r in chunk if r["task_key"] not in fresh]
            if known:
                self._upsert(
                    "upsert_tasks",
                    "app_evolution_tasks",
                    known,
                    on_conflict="task_key",
                    returning=ReturnMethod.minimal,
                )
        return new

    def list_tasks(self, app_id: str, source: str | None = None) -> list[Task]:
        def query() -> Any:
            q = self._table("app_evolution_tasks").select("*").eq("app_id", app_id)
            if source:
                q = q.eq("source", source)
            return q.order("priority").order("created_at").order("task_key")

        return [
            Task.model_validate(dict(r))  # extra columns (task_key, timestamps) are ignored
            for r in self._select_all("list_tasks", query)
        ]

    # Trajectories ----------------------------------------------------------------
    def record_trajectory(self, trajectory: Trajectory) -> None:
        from postgrest.types import ReturnMethod

        row = trajectory.model_dump(mode="json")
        row["created_at"] = _iso(trajectory.created_at or datetime.now(UTC))
        self._upsert(
            "record_trajectory",
            "trajectories",
            row,
            on_conflict="app_id,run_id",
            ignore_duplicates=True,
            returning=ReturnMethod.minimal,
        )

    def list_trajectories(self, app_id: str) -> list[Trajectory]:
        rows = self._select_all(
            "list_trajectories",
            lambda: (
                self._table("trajectories")
                .select("*")
                .eq("app_id", app_id)
                .order("created_at")
                .order("run_id")
            ),
        )
        return [Trajectory.model_validate(r) for r in rows]

    def reward_means(self, app_ids: Iterable[str]) -> dict[str, float]:
        ids = list(dict.fromkeys(app_ids))
        if not ids:
            return {}
        # POST, not GET: the id list goes in the body, whatever the fleet's size.
        rows = self._rpc("fleet_reward_means", {"p_app_ids": ids})
        return {r["app_id"]: float(r["reward_mean"]) for r in rows}

    # Fleet config and cohorts ----------------------------------------------------
    def get_fleet_config(self) -> FleetConfig:
        rows = self._call(
            "get_fleet_config", lambda: self._table("fleet_config").select("key,value").execute()
        ).data
        return FleetConfig.model_validate({r["key"]: r["value"] for r in rows})

    def set_fleet_config(self, config: FleetConfig) -> None:
        from postgrest.types import ReturnMethod

        rows = [{"key": k, "value": v} for k, v in config.model_dump(mode="json").items()]
        self._upsert(
            "set_fleet_config",
            "fleet_config",
            rows,
            on_conflict="key",
            returning=ReturnMethod.minimal,
        )

    def record_cohort(self, run_id: str, app_ids: list[str], now: datetime) -> None:
        from postgrest.types import ReturnMethod

        row = {"run_id": run_id, "app_ids": list(app_ids), "started_at": _iso(now)}
        self._upsert(
            "record_cohort",
            "cohorts",
            row,
            on_conflict="run_id",
            ignore_duplicates=True,
            returning=ReturnMethod.minimal,
        )

    def finish_cohort(self, run_id: str, now: datetime) -> None:
        from postgrest.types import ReturnMethod

        self._call(
            "finish_cohort",
            lambda: (
                self._table("cohorts")
                .update({"finished_at": _iso(now)}, returning=ReturnMethod.minimal)
                .eq("run_id", run_id)
                .is_("finished_at", None)
                .execute()
            ),
        )

    def completed_cohorts(self) -> int:
        from postgrest.types import CountMethod

        response = self._call(
            "completed_cohorts",
            lambda: (
                self._table("cohorts")
                .select("run_id", count=CountMethod.exact, head=True)
                .not_.is_("finished_at", None)
                .neq("app_ids", "[]")
                .execute()
            ),
        )
        if response.count is None:
            raise StoreUnavailable(
                f"Supabase at {self.url}: completed_cohorts got no row count (Content-Range) "
                "— is a proxy stripping headers?"
            )
        return response.count

    # Leadership leases -----------------------------------------------------------
    def acquire_lease(
        self, name: str, holder: str, now: datetime, lease_seconds: float
    ) -> int | None:
        """Acquire or renew lease `name`; the fencing epoch, or None while another holds it."""
        return self._rpc_epoch(
            "fleet_acquire_lease",
            {
                "p_name": name,
                "p_holder": holder,
                "p_now": _iso(now),
                "p_lease_seconds": float(lease_seconds),
            },
        )

    def release_lease(self, name: str, holder: str, epoch: int, now: datetime) -> bool:
        """Give the lease up early; False if `holder` at `epoch` no longer holds it."""
        return self._rpc_flag(
            "fleet_release_lease",
            {
                "p_name": name,
                "p_holder": holder,
                "p_epoch": epoch,
                "p_now": _iso(now),
            },
        )

    def get_lease(self, name: str) -> Lease | None:
        rows = self._call(
            "get_lease", lambda: self._table("fleet_leases").select("*").eq("name", name).execute()
        ).data
        return Lease.model_validate(rows[0]) if rows else None

    def close(self) -> None:
        self._http.close()

    # Cost and work ledger --------------------------------------------------------
    def record_work(self, entry: WorkEntry) -> None:
        from postgrest.types import ReturnMethod

        row = entry.model_dump(mode="json") | {"recorded_at": _iso(entry.recorded_at)}
        self._call(
            "record_work",
            lambda: (
                self._table("work_ledger")
                .upsert(
                    row, on_conflict="id", ignore_duplicates=True, returning=ReturnMethod.minimal
                )
                .execute()
            ),
        )

    def work_totals(
        self, by: TotalsBy, since: datetime | None = None, run_id: str | None = None
    ) -> list[WorkTotal]:
        rows = self._rpc(
            "fleet_work_totals",
            {"p_by": by, "p_since": _iso(since) if since else None, "p_run_id": run_id},
        )
        return [WorkTotal.model_validate(r) for r in rows or []]

    def open_cohort_spend(self) -> float:
        return float(_scalar(self._rpc("fleet_open_cohort_spend", {})) or 0.0)
