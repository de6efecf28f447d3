"""Hydra client: the production QualityGate (`GET /status/{app_id}` → phase, cycle, isPassing)."""

from __future__ import annotations

import json
import logging

from fleet.clients.base import UNKNOWN_PHASE, GateStatus
from fleet.clients.transport import JsonEndpoint, ServiceClient, ServiceInfo, excerpt
from fleet.errors import QualityGateError, QualityGateUnavailable

log = logging.getLogger("fleet.hydra")

HYDRA = ServiceInfo(
    name="Hydra",
    key="hydra",
    token_hint="the Hydra block / FLEET_HYDRA_TOKEN",
    error=QualityGateError,
    unavailable=QualityGateUnavailable,
)

DETAIL_CHARS = 500


class HydraGate(ServiceClient):
    """QualityGate over Hydra's HTTP API (DESIGN §4)."""

    service = HYDRA

    async def status(self, app_id: str) -> GateStatus:
        path = f"/status/{JsonEndpoint.segment(app_id)}"
        code, body = await self._http.acall("GET", path, idempotent=True)
        if code == 404:
            # Right after `/meta:hydra` is dispatched Hydra may not know the app yet; the
            # pipeline's 4 h hard stop bounds the wait, so this is "not passing", not an error.
            return GateStatus(
                phase=UNKNOWN_PHASE,
                is_passing=False,
                detail=f"Hydra has no status for {app_id!r} yet (404)",
            )
        return gate_status(body, app_id)


def gate_status(body: object, app_id: str) -> GateStatus:
    """Map Hydra's `{phase, cycle, quality: {isPassing, score, ...}}` to a GateStatus.

    Only a JSON `true` passes: a missing, null or "true"-string isPassing is not passing,
    because passing ships the app.
    """
    if not isinstance(body, dict) or not isinstance(body.get("phase"), str):
        raise QualityGateError(
            f"Hydra status for {app_id!r} has no phase; expected "
            '{"phase": ..., "cycle": ..., "quality": {"isPassing": ...}}, '
            f"got {excerpt(repr(body))}"
        )
    quality = body.get("quality") or {}
    if not isinstance(quality, dict):
        raise QualityGateError(
            f"Hydra status for {app_id!r}: quality should be an object, "
            f"got {excerpt(repr(quality))}"
        )
    cycle = body.get("cycle", 0)
    try:
        cycle = int(cycle or 0)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses to infinity
        raise QualityGateError(
            f"Hydra status for {app_id!r}: cycle should be a number, got {excerpt(repr(cycle))}"
        ) from None
    score = quality.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        score = None
    rest = {k: v for k, v in quality.items() if k not in ("isPassing", "score")}
    detail = excerpt(json.dumps(rest, sort_keys=True, default=str), DETAIL_CHARS) if rest else None
    return GateStatus(
        phase=body["phase"],
        cycle=cycle,
        is_passing=quality.get("isPassing") is True,
        score=float(score) if score is not None else None,
        detail=detail,
    )
