"""HydraGate against the real Hydra dev server on 127.0.0.1."""

from __future__ import annotations

import logging
import sys
import uuid

import httpx
import pytest
from pydantic import SecretStr

from fleet.clients.base import GateStatus, QualityGate
from fleet.clients.breaker import CircuitBreaker
from fleet.clients.hydra import HydraGate, gate_status
from fleet.clock import ManualClock
from fleet.devservers import HydraDevServer
from fleet.errors import ConfigError, QualityGateError, QualityGateUnavailable

TOKEN = "hydra-token-" + uuid.uuid4().hex


@pytest.fixture
def server():
    with HydraDevServer(token=TOKEN) as srv:
        yield srv


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def make(server, clock):
    made: list[HydraGate] = []

    def _make(**kw) -> HydraGate:
        kw.setdefault("token", SecretStr(TOKEN))
        kw.setdefault("clock", clock)
        kw.setdefault("breaker", CircuitBreaker(f"hydra-test-{uuid.uuid4().hex[:8]}", 2, 60, clock))
        kw.setdefault("timeout", 5)
        gate = HydraGate(kw.pop("url", server.url), **kw)
        made.append(gate)
        return gate

    yield _make
    for gate in made:
        gate.close()


def test_is_a_quality_gate(make):
    assert isinstance(make(), QualityGate)


async def test_passing_status_maps_to_gate_status(server, make):
    server.set_status(
        "habit-tracker", phase="complete", cycle=7, is_passing=True, score=0.93, tests="41/41"
    )
    status = await make().status("habit-tracker")
    assert status == GateStatus(
        phase="complete", cycle=7, is_passing=True, score=0.93, detail='{"tests": "41/41"}'
    )


async def test_never_passing_app_stays_not_passing(server, make):
    server.set_check(
        "stubborn", [sys.executable, "-c", "import sys; print('2 failures'); sys.exit(1)"]
    )
    gate = make()
    seen = [await gate.status("stubborn") for _ in range(4)]
    assert [s.is_passing for s in seen] == [False] * 4
    assert [s.cycle for s in seen] == [1, 2, 3, 4]
    assert "2 failures" in (seen[-1].detail or "")


async def test_check_command_passes_once_its_condition_holds(server, make, tmp_path):
    marker = tmp_path / "quality.ok"
    server.set_check("app1", ["test", "-f", str(marker)])
    gate = make()
    assert (await gate.status("app1")).is_passing is False
    marker.write_text("ok")
    after = await gate.status("app1")
    assert after.is_passing is True and after.phase == "complete" and after.score == 1.0


async def test_unknown_app_is_not_passing_rather_than_an_error(make):
    status = await make().status("not-started-yet")
    assert status.is_passing is False and status.phase == "unknown"
    assert "404" in (status.detail or "")


@pytest.mark.parametrize("value", ["true", 1, None, "yes"])
async def test_only_a_json_true_passes(server, make, value):
    # Set over the admin endpoint, as an operator would.
    httpx.put(
        f"{server.url}/_admin/apps/odd",
        json={"phase": "complete", "cycle": 1, "quality": {"isPassing": value, "score": 1}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).raise_for_status()
    assert (await make().status("odd")).is_passing is False


def test_status_without_phase_is_an_error():
    with pytest.raises(QualityGateError, match="no phase"):
        gate_status({"cycle": 1, "quality": {"isPassing": True}}, "app1")
    with pytest.raises(QualityGateError, match="cycle should be a number"):
        gate_status({"phase": "x", "cycle": "many"}, "app1")


async def test_app_ids_cannot_change_the_path(server, make):
    await make().status("../_admin/faults")
    assert server.requests[-1] == ("GET", "/status/..%2F_admin%2Ffaults")


async def test_malformed_json_is_a_quality_gate_error(server, make):
    server.set_status("app1")
    server.set_faults(malformed_next=1)
    with pytest.raises(QualityGateError, match="malformed JSON"):
        await make().status("app1")


async def test_5xx_burst_absorbed_and_storm_opens_the_breaker(server, make, clock):
    server.set_status("app1", is_passing=True, phase="complete")
    gate = make()
    server.set_faults(fail_next=2)
    assert (await gate.status("app1")).is_passing is True
    server.set_faults(fail_next=1000, fail_status=502)
    for _ in range(2):
        with pytest.raises(QualityGateUnavailable, match="502 .* after 3 attempts"):
            await gate.status("app1")
    assert gate.breaker.state == "open"
    with pytest.raises(QualityGateUnavailable, match="circuit breaker"):
        await gate.status("app1")
    server.clear_faults()
    clock.advance(60)
    assert (await gate.status("app1")).is_passing is True
    assert gate.breaker.state == "closed"


async def test_hang_beyond_timeout_is_retried_then_unavailable(server, make):
    server.set_status("app1")
    server.set_faults(hang_next=3, hang_seconds=5)
    with pytest.raises(QualityGateUnavailable, match="after 3 attempts"):
        await make(timeout=0.2).status("app1")
    assert len([r for r in server.requests if r[1] == "/status/app1"]) == 3


async def test_wrong_token_is_clear_and_secret(server, make, caplog):
    server.set_status("app1")
    wrong = "wrong-" + TOKEN
    with caplog.at_level(logging.DEBUG), pytest.raises(QualityGateError) as err:
        await make(token=SecretStr(wrong)).status("app1")
    assert (
        str(err.value) == "Hydra refused the token (401): check the Hydra block / FLEET_HYDRA_TOKEN"
    )
    assert wrong not in caplog.text and TOKEN not in caplog.text


def test_plain_http_to_a_remote_host_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="FLEET_ALLOW_INSECURE_TRANSPORT=true"):
        HydraGate("http://mac1.lan:8095")
    HydraGate("http://mac1.lan:8095", allow_insecure=True).close()


async def test_block_builds_the_gate_and_keeps_the_token_secret(server):
    from blocks.integrations import HydraBlock

    server.set_status("app1", is_passing=True, phase="complete")
    block = HydraBlock(url=server.url, token=SecretStr(TOKEN))
    assert TOKEN not in repr(block) and TOKEN not in block.model_dump_json()
    gate = block.get_client()
    assert TOKEN not in repr(gate)
    assert (await gate.status("app1")).is_passing is True


def test_a_cycle_json_makes_infinite_is_an_error():
    with pytest.raises(QualityGateError, match="cycle should be a number"):
        gate_status({"phase": "x", "cycle": float("inf")}, "app1")


async def test_a_thousand_apps_polling_at_once_queue_instead_of_timing_out(server, make):
    import asyncio

    gate = make()
    statuses = await asyncio.gather(*(gate.status(f"app{i}") for i in range(1000)))
    assert {s.phase for s in statuses} == {"unknown"}  # every poll answered; none timed out
    assert gate.breaker.state == "closed"
