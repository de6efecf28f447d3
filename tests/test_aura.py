"""AuraGatewayDispatcher against the real AuraGateway dev server on 127.0.0.1 (real processes)."""

from __future__ import annotations

import logging
import sys
import uuid

import pytest
from pydantic import SecretStr

from fleet.clients.aura import AuraGatewayDispatcher
from fleet.clients.base import Dispatcher
from fleet.clients.breaker import CircuitBreaker
from fleet.clock import ManualClock, SystemClock
from fleet.devservers import AuraDevServer
from fleet.errors import (
    AgentFailed,
    ConfigError,
    DispatchError,
    DispatchTimeout,
    GatewayUnavailable,
    UnknownTask,
)

TOKEN = "aura-token-" + uuid.uuid4().hex  # unique, so a leak is unmistakable
PY = sys.executable


@pytest.fixture
def server():
    with AuraDevServer(token=TOKEN) as srv:
        yield srv


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def make(server, clock):
    made: list[AuraGatewayDispatcher] = []

    def _make(**kw) -> AuraGatewayDispatcher:
        kw.setdefault("token", SecretStr(TOKEN))
        kw.setdefault("clock", clock)
        kw.setdefault(
            "breaker", CircuitBreaker(f"aura-test-{uuid.uuid4().hex[:8]}", 3, 60, kw["clock"])
        )
        kw.setdefault("timeout", 5)
        d = AuraGatewayDispatcher(kw.pop("url", server.url), **kw)
        made.append(d)
        return d

    yield _make
    for d in made:
        d.close()


def _gets(server, task_id):
    return [r for r in server.requests if r == ("GET", f"/tasks/{task_id}")]


# -- happy paths ---------------------------------------------------------------------------


def test_is_a_dispatcher(make):
    assert isinstance(make(), Dispatcher)


async def test_spawn_runs_the_command_and_returns_its_output(server, make):
    aura = make()
    task_id = await aura.spawn([PY, "-c", "print('skill says hi')"])
    server.wait(task_id)
    assert await aura.poll_and_retrieve(task_id, timeout=3600) == "skill says hi\n"


async def test_dispatch_sends_target_and_model_and_argv_survives_without_a_shell(server, make):
    aura = make()
    tricky = "it's a b; touch /tmp/pwned-$USER && echo $HOME"
    task_id = await aura.dispatch(
        [PY, "-c", "import sys; print(sys.argv[1])", tricky], "mac4", "codex"
    )
    task = server.wait(task_id)
    assert (task.target, task.model) == ("mac4", "codex")
    assert await aura.poll_and_retrieve(task_id, timeout=1800) == tricky + "\n"


async def test_poll_waits_for_a_real_running_command(make):
    # Real clock, short polls: the command finishes while we poll.
    aura = make(clock=SystemClock(), poll_initial=0.02, poll_max=0.1)
    task_id = await aura.spawn([PY, "-c", "import time; time.sleep(0.3); print('late')"])
    assert await aura.poll_and_retrieve(task_id, timeout=10) == "late\n"


async def test_failed_task_raises_with_the_gateway_error_text(server, make):
    aura = make()
    task_id = await aura.spawn([PY, "-c", "import sys; sys.exit('lint found 3 errors')"])
    server.wait(task_id)
    with pytest.raises(AgentFailed, match="lint found 3 errors") as err:
        await aura.poll_and_retrieve(task_id, timeout=60)
    assert task_id in str(err.value)


async def test_missing_executable_is_a_failed_task(server, make):
    aura = make()
    task_id = await aura.spawn(["no-such-binary-" + uuid.uuid4().hex[:6]])
    server.wait(task_id)
    with pytest.raises(AgentFailed, match="cannot run"):
        await aura.poll_and_retrieve(task_id, timeout=60)


async def test_unknown_task_id(make):
    with pytest.raises(UnknownTask, match="does not know task"):
        await make().poll_and_retrieve("no-such-task", timeout=60)


async def test_commands_must_be_argument_lists(make):
    aura = make()
    with pytest.raises(TypeError, match="argument list"):
        await aura.spawn("echo hi")
    with pytest.raises(ValueError, match="empty"):
        await aura.spawn([])


# -- polling -------------------------------------------------------------------------------


async def test_never_finishing_task_times_out_on_the_clock_with_backoff(server, make, clock):
    aura = make()
    server.set_faults(stall_next_tasks=1)
    task_id = await aura.spawn([PY, "-c", "pass"])
    start = clock.now()
    with pytest.raises(
        DispatchTimeout, match=rf"gateway task {task_id} still running after 3600 s"
    ):
        await aura.poll_and_retrieve(task_id, timeout=3600)
    assert (clock.now() - start).total_seconds() == pytest.approx(3600)
    sleeps = clock.sleeps
    assert sleeps[0] == pytest.approx(2, rel=0.2)
    assert sleeps[1] == pytest.approx(4, rel=0.2)  # doubling…
    assert max(sleeps) <= 60  # …up to poll_max
    assert len(sleeps) < 80  # not a fixed hammer: ~65 polls for an hour, not 1800
    assert len(_gets(server, task_id)) == len(sleeps) + 1


async def test_poll_jitter_differs_between_dispatchers(server, make):
    server.set_faults(stall_next_tasks=2)
    runs = []
    for _ in range(2):
        c = ManualClock()
        aura = make(clock=c)
        with pytest.raises(DispatchTimeout):
            await aura.poll_and_retrieve(await aura.spawn(["true"]), timeout=30)
        runs.append(c.sleeps[:3])
    assert runs[0] != runs[1]


# -- transport faults ------------------------------------------------------------------------


async def test_5xx_burst_is_absorbed_by_the_transport_retry(server, make, clock):
    aura = make()
    task_id = await aura.spawn([PY, "-c", "print('ok')"])
    server.wait(task_id)
    server.set_faults(fail_next=2)
    assert await aura.poll_and_retrieve(task_id, timeout=60) == "ok\n"
    assert len(_gets(server, task_id)) == 3
    assert sum(clock.sleeps) <= 2.5  # the retry budget, slept on the injected clock
    assert aura.breaker.state == "closed"


async def test_spawn_is_not_repeated_after_a_5xx(server, make):
    aura = make()
    server.set_faults(fail_next=1)
    with pytest.raises(GatewayUnavailable, match="503") as err:
        await aura.spawn([PY, "-c", "pass"])
    assert "after 1 attempt" in str(err.value) and "not retried" in str(err.value)
    assert [r for r in server.requests if r[0] == "POST"] == [("POST", "/spawn")]
    assert server.tasks() == []  # the 503 came before the gateway started anything


async def test_5xx_storm_fails_clearly_opens_the_breaker_and_a_probe_closes_it(server, make, clock):
    aura = make()  # breaker: 3 consecutive failures, 60 s reset
    task_id = await aura.spawn([PY, "-c", "print('after the storm')"])
    server.wait(task_id)
    server.set_faults(fail_next=1000)
    for _ in range(3):
        with pytest.raises(
            GatewayUnavailable, match=r"answered 503 to GET /tasks/\S+ after 3 attempts"
        ):
            await aura.poll_and_retrieve(task_id, timeout=60)
    assert aura.breaker.state == "open"
    sent = len(server.requests)
    with pytest.raises(GatewayUnavailable, match="circuit breaker .* is open"):
        await aura.poll_and_retrieve(task_id, timeout=60)
    assert len(server.requests) == sent  # refused locally, the gateway is left alone

    server.clear_faults()
    clock.advance(60)
    assert aura.breaker.state == "half_open"
    assert await aura.poll_and_retrieve(task_id, timeout=60) == "after the storm\n"
    assert aura.breaker.state == "closed"


async def test_failed_half_open_probe_reopens(server, make, clock):
    aura = make()
    task_id = await aura.spawn(["true"])
    server.wait(task_id)
    server.set_faults(fail_next=1000)
    for _ in range(3):
        with pytest.raises(GatewayUnavailable):
            await aura.poll_and_retrieve(task_id, timeout=60)
    clock.advance(61)
    with pytest.raises(GatewayUnavailable, match="503"):
        await aura.poll_and_retrieve(task_id, timeout=60)  # the probe, still failing
    assert aura.breaker.state == "open"


async def test_wrong_token_is_a_clear_error_without_the_token(server, make, caplog):
    aura = make(token=SecretStr("wrong-" + TOKEN))
    with caplog.at_level(logging.DEBUG), pytest.raises(DispatchError) as err:
        await aura.spawn(["true"])
    assert str(err.value) == (
        "AuraGateway refused the token (401): check the AuraGateway block / FLEET_AURA_TOKEN"
    )
    assert not isinstance(err.value, GatewayUnavailable)
    assert TOKEN not in caplog.text and TOKEN not in repr(err.value)


async def test_injected_401_fault(server, make):
    server.set_faults(reject_auth=True)
    with pytest.raises(DispatchError, match=r"refused the token \(401\)"):
        await make().spawn(["true"])


async def test_malformed_json_is_a_dispatch_error_with_an_excerpt(server, make):
    aura = make()
    task_id = await aura.spawn(["true"])
    server.wait(task_id)
    server.set_faults(malformed_next=1)
    with pytest.raises(DispatchError, match=r'malformed JSON.*"status": "done"'):
        await aura.poll_and_retrieve(task_id, timeout=60)


async def test_slow_answers_within_the_http_timeout_are_fine(server, make):
    aura = make(timeout=2)
    server.set_faults(latency=0.2)
    task_id = await aura.spawn([PY, "-c", "print('slow but fine')"])
    server.wait(task_id)
    assert await aura.poll_and_retrieve(task_id, timeout=60) == "slow but fine\n"


async def test_hang_beyond_the_http_timeout_is_retried_then_fails(server, make):
    aura = make(timeout=0.2)
    task_id = await aura.spawn(["true"])
    server.wait(task_id)
    server.set_faults(hang_next=3, hang_seconds=5)
    with pytest.raises(
        GatewayUnavailable, match=r"ReadTimeout.*after 3 attempts|after 3 attempts.*ReadTimeout"
    ):
        await aura.poll_and_retrieve(task_id, timeout=60)
    assert len(_gets(server, task_id)) == 3


async def test_hung_spawn_is_not_resent(server, make):
    aura = make(timeout=0.2)
    server.set_faults(hang_next=1, hang_seconds=5)
    with pytest.raises(GatewayUnavailable, match="not retried: POST /spawn starts work"):
        await aura.spawn(["true"])
    assert [r for r in server.requests if r[0] == "POST"] == [("POST", "/spawn")]


async def test_refused_connection_is_retried_even_for_spawn(make, clock):
    dead = AuraDevServer().start()
    url = dead.url
    dead.stop()
    aura = make(url=url)
    with pytest.raises(GatewayUnavailable, match=r"after 3 attempts \(ConnectError"):
        await aura.spawn(["true"])
    assert len(clock.sleeps) == 2


# -- configuration and secrets ---------------------------------------------------------------


def test_plain_http_to_a_remote_host_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="FLEET_ALLOW_INSECURE_TRANSPORT=true"):
        AuraGatewayDispatcher("http://mac1.lan:8001", SecretStr(TOKEN))
    allowed = AuraGatewayDispatcher("http://mac1.lan:8001", SecretStr(TOKEN), allow_insecure=True)
    assert "mac1.lan" in repr(allowed)


async def test_token_never_in_repr_logs_or_errors(server, make, caplog):
    aura = make()
    assert TOKEN not in repr(aura) and TOKEN not in str(vars(aura))
    with caplog.at_level(logging.DEBUG):
        task_id = await aura.spawn([PY, "-c", "print(1)"])
        server.wait(task_id)
        server.set_faults(fail_next=4)
        with pytest.raises(GatewayUnavailable) as err:
            await aura.poll_and_retrieve(task_id, timeout=60)
    assert caplog.records  # retries and requests were logged…
    assert TOKEN not in caplog.text  # …without the token
    assert TOKEN not in str(err.value)


def test_token_must_be_a_secret():
    with pytest.raises(TypeError, match="SecretStr"):
        AuraGatewayDispatcher("http://127.0.0.1:1", TOKEN)  # type: ignore[arg-type]


async def test_block_builds_the_client_and_keeps_the_token_secret(server):
    from blocks.integrations import AuraGatewayBlock

    block = AuraGatewayBlock(url=server.url, token=SecretStr(TOKEN))
    for shown in (repr(block), str(block), str(block.model_dump()), block.model_dump_json()):
        assert TOKEN not in shown
    with block.get_client() as aura:
        task_id = await aura.spawn([PY, "-c", "print('via block')"])
        server.wait(task_id)
        assert await aura.poll_and_retrieve(task_id, timeout=60) == "via block\n"


async def test_a_start_with_an_idempotency_key_sends_it_and_is_retried_after_a_5xx(
    server, make, clock
):
    aura = make()
    server.set_faults(fail_next=1)
    task_id = await aura.spawn([PY, "-c", "print('once')"], idempotency_key="app1:skill:epoch-3")
    server.wait(task_id)
    assert await aura.poll_and_retrieve(task_id, timeout=60) == "once\n"
    assert [r for r in server.requests if r[0] == "POST"] == [("POST", "/spawn")] * 2
    assert len(server.tasks()) == 1 and len(clock.sleeps) == 1  # the 503 started nothing


async def test_the_idempotency_key_travels_as_a_header():
    import httpx

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"task_id": "t-1"})

    aura = AuraGatewayDispatcher(
        "http://127.0.0.1:1",
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        clock=ManualClock(),
        breaker=CircuitBreaker(f"aura-test-{uuid.uuid4().hex[:8]}", 3, 60, ManualClock()),
    )
    assert (
        await aura.dispatch(["true"], target="mac4", model="codex", idempotency_key="k-42") == "t-1"
    )
    assert await aura.spawn(["true"]) == "t-1"
    assert seen[0].headers["Idempotency-Key"] == "k-42" and "Idempotency-Key" not in seen[1].headers
