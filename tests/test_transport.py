"""Endpoint checks and the one retry layer of the HTTP clients."""

from __future__ import annotations

import httpx
import pytest

from fleet.clients.breaker import CircuitBreaker
from fleet.clients.transport import (
    INSECURE_FLAG,
    JsonEndpoint,
    RetryPolicy,
    ServiceInfo,
    check_endpoint,
    display_url,
    retried_by_transport,
)
from fleet.clock import ManualClock
from fleet.errors import (
    CircuitOpen,
    ConfigError,
    DispatchError,
    GatewayUnavailable,
    QualityGateUnavailable,
    UnknownTask,
)


@pytest.mark.parametrize(
    "url",
    [
        "https://mac1.example:8001",
        "http://127.0.0.1:8001",
        "http://127.8.9.10:8001",
        "http://localhost:8095",
        "http://[::1]:8001/",
    ],
)
def test_secure_or_loopback_endpoints_pass(url):
    check_endpoint(url, allow_insecure=False)


def test_plain_http_to_another_host_is_refused_and_names_the_flag():
    with pytest.raises(ConfigError) as err:
        check_endpoint("http://user:hunter2@10.0.0.7:8001/api", allow_insecure=False)
    message = str(err.value)
    assert INSECURE_FLAG == "FLEET_ALLOW_INSECURE_TRANSPORT=true"
    assert INSECURE_FLAG in message
    assert "10.0.0.7" in message
    assert "hunter2" not in message  # credentials in a URL never reach a message


def test_plain_http_allowed_by_the_flag_with_a_warning(caplog):
    check_endpoint("http://10.0.0.7:8001", allow_insecure=True)
    assert any("FLEET_ALLOW_INSECURE_TRANSPORT" in r.getMessage() for r in caplog.records)


def test_tls_verification_off_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="FLEET_ALLOW_INSECURE_TRANSPORT=true"):
        check_endpoint("https://mac1.example", allow_insecure=False, verify=False)
    check_endpoint("https://mac1.example", allow_insecure=True, verify=False)


@pytest.mark.parametrize("url", ["ftp://mac1", "mac1:8001", "http://", "http://host:notaport"])
def test_malformed_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        check_endpoint(url, allow_insecure=True)


def test_display_url_drops_credentials_and_query():
    assert (
        display_url("https://u:p@host.example:8443/base/?token=abc")
        == "https://host.example:8443/base"
    )


def test_retry_sleeps_stay_within_the_budget():
    sleeps: list[float] = []
    policy = RetryPolicy()
    retrying = policy.retrying(lambda exc: True, sleeps.append, None)
    calls = 0
    with pytest.raises(RuntimeError):
        for attempt in retrying:
            with attempt:
                calls += 1
                raise RuntimeError("always")
    assert calls == 3
    assert len(sleeps) == 2
    assert sum(sleeps) <= 2.5
    assert sleeps[1] > sleeps[0] - policy.jitter  # exponential, not a fixed hammer


def _endpoint(handler, *, breaker=None, sleeps=None) -> JsonEndpoint:
    service = ServiceInfo(
        "Svc", "svc", "the Svc block / FLEET_SVC_TOKEN", DispatchError, GatewayUnavailable
    )
    return JsonEndpoint(
        service,
        "http://127.0.0.1:1",
        None,
        allow_insecure=False,
        timeout=1,
        client=httpx.Client(transport=httpx.MockTransport(handler)),
        breaker=breaker or CircuitBreaker("transport-test", 5, 60, ManualClock()),
        clock=_SleepRecorder(sleeps if sleeps is not None else []),
    )


class _SleepRecorder(ManualClock):
    """A ManualClock that also hands each sleep to the caller's list."""

    def __init__(self, sleeps: list[float]):
        super().__init__()
        self.sleeps = sleeps


def test_post_is_not_retried_on_5xx_but_get_is():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return httpx.Response(503, text="busy")

    endpoint = _endpoint(handler)
    with pytest.raises(GatewayUnavailable, match="after 1 attempt"):
        endpoint.call("POST", "/spawn", body={"command": "true"}, idempotent=False)
    assert seen == ["POST"]
    with pytest.raises(GatewayUnavailable, match="after 3 attempts"):
        endpoint.call("GET", "/tasks/x", idempotent=True)
    assert seen == ["POST", "GET", "GET", "GET"]


def test_a_non_retryable_500_is_not_retried():
    seen: list[str] = []

    def handler(request):
        seen.append(request.method)
        return httpx.Response(500, text="Traceback: KeyError")

    with pytest.raises(DispatchError, match="answered 500") as err:
        _endpoint(handler).call("GET", "/tasks/x", idempotent=True)
    assert not isinstance(err.value, GatewayUnavailable)
    assert len(seen) == 1


def test_open_breaker_sends_nothing():
    seen = []
    breaker = CircuitBreaker("transport-open", 1, 60, ManualClock())
    breaker.record_failure("earlier")
    endpoint = _endpoint(lambda r: seen.append(r) or httpx.Response(200, json={}), breaker=breaker)
    with pytest.raises(GatewayUnavailable, match="circuit breaker") as err:
        endpoint.call("GET", "/tasks/x", idempotent=True)
    assert isinstance(err.value.__cause__, CircuitOpen)
    assert seen == []


def test_path_segments_are_escaped():
    assert JsonEndpoint.segment("../admin?x=1") == "..%2Fadmin%3Fx%3D1"
    for bad in ("", ".", ".."):
        with pytest.raises(ValueError):
            JsonEndpoint.segment(bad)


def test_retried_by_transport_marks_errors_prefect_must_not_retry():
    assert retried_by_transport(GatewayUnavailable("x"))
    assert retried_by_transport(QualityGateUnavailable("x"))
    assert not retried_by_transport(UnknownTask("x"))
    assert GatewayUnavailable.transient is False  # the engine's task retries skip it too


@pytest.mark.parametrize(
    "body",
    ["[" * 100_000 + "]" * 100_000, '{"n": ' + "9" * 5000 + "}"],
    ids=["nested-too-deep", "int-too-long"],
)
def test_json_python_cannot_parse_is_malformed_and_counts_against_the_breaker(body):
    breaker = CircuitBreaker("transport-bomb", 5, 60, ManualClock())
    endpoint = _endpoint(lambda r: httpx.Response(200, text=body), breaker=breaker)
    with pytest.raises(DispatchError, match="malformed JSON"):
        endpoint.call("GET", "/tasks/x", idempotent=True)
    assert breaker.snapshot()["failures"] == 1  # recorded: a half-open probe cannot stay in flight


def test_credentials_in_the_url_never_name_the_breaker():
    service = ServiceInfo("Svc", "svc", "the Svc block", DispatchError, GatewayUnavailable)
    endpoint = JsonEndpoint(
        service,
        "http://ops:hunter2@127.0.0.1:1",
        None,
        allow_insecure=False,
        timeout=1,
        client=None,
        breaker=None,
        clock=ManualClock(),
    )
    try:
        assert "hunter2" not in endpoint.breaker.name and "127.0.0.1:1" in endpoint.breaker.name
    finally:
        endpoint.close()


def test_plain_http_never_goes_through_a_proxy_from_the_environment(monkeypatch):
    """A proxy would carry the bearer token in the clear; loopback http:// is sent direct."""
    from fleet.devservers.hydra import HydraDevServer

    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    service = ServiceInfo("Svc", "svc", "the Svc block", DispatchError, GatewayUnavailable)
    with HydraDevServer() as server:
        endpoint = JsonEndpoint(
            service,
            server.url,
            None,
            allow_insecure=False,
            timeout=5,
            client=None,
            breaker=CircuitBreaker("transport-proxy", 5, 60, ManualClock()),
            clock=ManualClock(),
        )
        try:
            status, _ = endpoint.call("GET", "/status/app1", idempotent=True)
        finally:
            endpoint.close()
    assert status in (200, 404)
