"""HTTP plumbing of the AuraGateway and Hydra clients: endpoint checks, one retry layer, errors.

Retry layers. Each call here is retried by exactly one layer, this one: tenacity, 3 attempts
with exponential backoff and jitter (sleeps ≤ ~2.5 s in all, through an injectable sleep),
on transient failures only — connect errors, timeouts, 429/502/503/504. What reaches the
caller (GatewayUnavailable, QualityGateUnavailable) has already been retried: a Prefect task
wrapping these calls must NOT retry those errors again (see `retried_by_transport`, meant for
its `retry_condition_fn`), or one outage turns into retries × retries requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self, TypedDict, Unpack
from urllib.parse import quote, urlsplit

import httpx
import tenacity
from pydantic import SecretStr

from fleet.clients.breaker import CircuitBreaker, breaker_for
from fleet.clock import Clock, SystemClock
from fleet.errors import (
    CircuitOpen,
    ConfigError,
    ExtractionError,
    FleetError,
    GatewayUnavailable,
    QualityGateUnavailable,
)

log = logging.getLogger("fleet.transport")

INSECURE_FLAG = "FLEET_ALLOW_INSECURE_TRANSPORT=true"

# Statuses that say "not now" rather than "no": worth another attempt on an idempotent call.
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
# What a body Python cannot parse raises: bad JSON or UTF-8 (both ValueError), an integer of
# over 4 300 digits (ValueError), nesting deeper than the recursion limit (RecursionError).
UNPARSABLE = (ValueError, RecursionError)

# Failures before any byte of the request left: safe to retry even a non-idempotent POST.
NOT_SENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# Failures that may come after the server got the request: retried only when idempotent.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)

EXCERPT_CHARS = 200
# Requests one endpoint has in flight from one process at once. A thousand apps polling
# Hydra together queue here, at no cost, instead of timing out in the connection pool.
MAX_IN_FLIGHT = 16


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback IPs (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def display_url(url: str) -> str:
    """The URL without user:password@ and query, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


def check_endpoint(url: str, *, allow_insecure: bool, verify: bool = True) -> None:
    """Refuse a URL that would send tokens in the clear: plain http:// to a non-loopback host,
    or TLS verification off, unless `allow_insecure` (FLEET_ALLOW_INSECURE_TRANSPORT=true)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 — raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"endpoint URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"endpoint URL {display_url(url)!r} must start with https:// (or http:// for a "
            "loopback address)"
        )
    if not parts.hostname:
        raise ConfigError(
            f"endpoint URL {url!r} has no host; expected e.g. https://mac1.example:8001"
        )
    host = parts.hostname
    if parts.scheme == "http" and not is_loopback(host):
        if not allow_insecure:
            raise ConfigError(
                f"refusing plain http:// to {display_url(url)}: {host} is not a loopback "
                "address, so the bearer token would cross the network unencrypted. Use "
                f"https://, or set {INSECURE_FLAG} (allow_insecure=True on the block) if "
                "this network is trusted."
            )
        log.warning(
            "plain http:// to non-loopback %s allowed by %s", display_url(url), INSECURE_FLAG
        )
    if not verify:
        if not allow_insecure:
            raise ConfigError(
                f"refusing to turn off TLS certificate verification for {display_url(url)}; "
                f"set {INSECURE_FLAG} (allow_insecure=True on the block) to allow it"
            )
        log.warning("TLS verification off for %s, allowed by %s", display_url(url), INSECURE_FLAG)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def retried_by_transport(exc: BaseException) -> bool:
    """True for errors this layer already retried (or refused via the breaker): a Prefect
    `retry_condition_fn` should return False for them, so no call is retried by two layers."""
    return isinstance(
        exc, (GatewayUnavailable, QualityGateUnavailable, CircuitOpen, ExtractionError)
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Transport retry budget. Defaults: 3 attempts, sleeps 0.5 s then 1 s (+ up to 0.5 s
    jitter each), so the sleeps stay under ~2.5 s and a call under 3 × timeout + 2.5 s."""

    attempts: int = 3
    initial: float = 0.5
    max_wait: float = 4.0
    jitter: float = 0.5

    def retrying(
        self,
        retry_if: Callable[[BaseException], bool],
        sleep: Callable[[float], None],
        before_sleep: Callable[[tenacity.RetryCallState], None],
    ) -> tenacity.Retrying:
        return tenacity.Retrying(sleep=sleep, **self._rules(retry_if, before_sleep))

    def aretrying(
        self,
        retry_if: Callable[[BaseException], bool],
        sleep: Callable[[float], Awaitable[None]],
        before_sleep: Callable[[tenacity.RetryCallState], None],
    ) -> tenacity.AsyncRetrying:
        """The same budget for awaitable calls: sleeps go through the clock's `asleep`."""
        return tenacity.AsyncRetrying(sleep=sleep, **self._rules(retry_if, before_sleep))

    def _rules(
        self,
        retry_if: Callable[[BaseException], bool],
        before_sleep: Callable[[tenacity.RetryCallState], None],
    ) -> dict[str, Any]:
        return dict(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential_jitter(
                initial=self.initial, max=self.max_wait, jitter=self.jitter
            ),
            retry=tenacity.retry_if_exception(retry_if),
            before_sleep=before_sleep,
            reraise=True,
        )


class _TransientStatus(Exception):
    """Internal: a retryable status answer, raised so tenacity sees it."""

    def __init__(self, response: httpx.Response):
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


@dataclass(frozen=True)
class ServiceInfo:
    """How one service is named in errors, and which errors it raises."""

    name: str  # "AuraGateway"
    key: str  # "aura": names its breakers, "aura <base url>"
    token_hint: str  # "the AuraGateway block / FLEET_AURA_TOKEN"
    error: type[FleetError]  # DispatchError
    unavailable: type[FleetError]  # GatewayUnavailable


class JsonEndpoint:
    """One JSON-over-HTTP service: base URL, bearer token, the retry layer and a breaker.

    `call` is the blocking path, `acall` the awaitable one the pipeline uses: both share the
    retry rule, the breaker and the error mapping, so each request is still retried by one
    layer. The async client is made per event loop (an httpx.AsyncClient's pooled connections
    belong to the loop that opened them; flows and tests may run on several loops in turn).
    """

    def __init__(
        self,
        service: ServiceInfo,
        base_url: str,
        token: SecretStr | None,
        *,
        allow_insecure: bool,
        timeout: float,
        client: httpx.Client | None = None,
        breaker: CircuitBreaker | None,
        clock: Clock,
        policy: RetryPolicy | None = None,
        async_client: httpx.AsyncClient | None = None,
    ):
        check_endpoint(base_url, allow_insecure=allow_insecure)
        if token is not None and not isinstance(token, SecretStr):
            raise TypeError(
                f"{service.name} token must be a pydantic SecretStr, not {type(token).__name__}"
            )
        self.service = service
        self.base_url = base_url.rstrip("/")
        self.shown_url = display_url(self.base_url)
        self._token = token
        # Plain http:// is only allowed to loopback (or by the operator's flag): a proxy from the
        # environment would carry the bearer token in the clear, so such requests go direct.
        self._trust_env = urlsplit(base_url).scheme.lower() != "http"
        self._client = client
        self._owns_client = client is None
        self._given_async_client = async_client
        self._async_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Semaphore]
        ] = weakref.WeakKeyDictionary()
        self._timeout = timeout
        # One shared breaker per endpoint unless the caller brings its own.
        self.breaker = breaker or breaker_for(f"{service.key} {self.shown_url}", clock=clock)
        self._clock = clock
        self.policy = policy or RetryPolicy()

    def __repr__(self) -> str:
        return f"JsonEndpoint({self.service.name}, {self.shown_url!r})"

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        self.close()
        held = self._async_clients.pop(asyncio.get_running_loop(), None)
        if held is not None and held[0] is not self._given_async_client:
            await held[0].aclose()

    def _sync_client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                timeout=self._timeout, follow_redirects=False, trust_env=self._trust_env
            )
        return self._client

    def _async_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """This loop's client and the bound on its requests in flight."""
        loop = asyncio.get_running_loop()
        held = self._async_clients.get(loop)
        if held is None:
            client = self._given_async_client or httpx.AsyncClient(
                timeout=self._timeout,
                follow_redirects=False,
                trust_env=self._trust_env,
                limits=httpx.Limits(max_connections=MAX_IN_FLIGHT),
            )
            held = self._async_clients[loop] = (client, asyncio.Semaphore(MAX_IN_FLIGHT))
        return held

    @staticmethod
    def segment(value: str) -> str:
        """One path segment, escaped so an id can never change the path."""
        if value in ("", ".", ".."):
            # URL normalisation would drop or climb these: no id may look like them.
            raise ValueError(f"{value!r} cannot be used as an id in a URL path")
        return quote(value, safe="")

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", **(extra or {})}
        if self._token is not None:
            # The secret is opened here, at the last moment, and only into the request.
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        return headers

    def call(
        self,
        method: str,
        path: str,
        *,
        body: dict | None = None,
        idempotent: bool,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send one request (retried as allowed) and return (status, parsed JSON body).

        Returns for 2xx and 404 (the caller decides what a missing thing means); raises the
        service's error for 401/403, other 4xx and 5xx, malformed JSON; its `unavailable`
        error when transient failures outlast the retries or the breaker is open.
        """
        what = f"{method} {path}"
        self._before_call(what)
        attempts = 0

        def send() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return _raise_transient(
                self._sync_client().request(**self._request(method, path, body, headers))
            )

        try:
            retrying = self.policy.retrying(
                self._retry_if(idempotent), self._clock.sleep, self._before_sleep(what)
            )
            response = retrying(send)
        except Exception as exc:
            raise self._failed(exc, what, attempts, idempotent) from None
        return self._answer(what, response)

    async def acall(
        self,
        method: str,
        path: str,
        *,
        body: dict | None = None,
        idempotent: bool,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """`call` without holding a thread: same retries, breaker and errors."""
        what = f"{method} {path}"
        self._before_call(what)
        attempts = 0

        async def send() -> httpx.Response:
            nonlocal attempts
            client, in_flight = self._async_client()
            async with in_flight:  # the wait for a turn is not part of the request's timeout
                attempts += 1
                response = await client.request(**self._request(method, path, body, headers))
            return _raise_transient(response)

        try:
            retrying = self.policy.aretrying(
                self._retry_if(idempotent), self._clock.asleep, self._before_sleep(what)
            )
            response: httpx.Response = await retrying(send)
        except Exception as exc:
            raise self._failed(exc, what, attempts, idempotent) from None
        return self._answer(what, response)

    def _request(
        self, method: str, path: str, body: dict | None, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        """One attempt's arguments to httpx's `request` (the token opened for it alone)."""
        return {
            "method": method,
            "url": self.base_url + path,
            "json": body,
            "headers": self._headers(headers),
            "timeout": self._timeout,
        }

    def _before_call(self, what: str) -> None:
        try:
            self.breaker.before_call()
        except CircuitOpen as exc:
            raise self.service.unavailable(
                f"{self.service.name} at {self.shown_url}: {what} not sent — {exc}. "
                f"Check that the {self.service.name} is running and reachable."
            ) from exc

    def _retry_if(self, idempotent: bool) -> Callable[[BaseException], bool]:
        def retry_if(exc: BaseException) -> bool:
            if isinstance(exc, NOT_SENT_ERRORS):
                return True
            # A POST that may have reached the server is not repeated: /spawn and /dispatch
            # start work, and a read timeout or 5xx does not tell us whether it started.
            # Repeating could run the agent command twice; failing lets the stage decide.
            if not idempotent:
                return False
            return isinstance(exc, (_TransientStatus, *TRANSIENT_ERRORS))

        return retry_if

    def _before_sleep(self, what: str) -> Callable[[tenacity.RetryCallState], None]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s %s: %s — retrying in %.1f s (attempt %d of %d)",
                self.service.name,
                what,
                _short(exc),
                state.upcoming_sleep,
                state.attempt_number,
                self.policy.attempts,
            )

        return before_sleep

    def _failed(self, exc: Exception, what: str, attempts: int, idempotent: bool) -> Exception:
        """The error a caller sees once the retries are spent; the breaker counts it."""
        self.breaker.record_failure(f"{what}: {_short(exc)}")
        method, _, path = what.partition(" ")
        if isinstance(exc, _TransientStatus):
            response = exc.response
            hint = "the transport already retried" if idempotent else _not_resent(method, path)
            return self.service.unavailable(
                f"{self.service.name} at {self.shown_url} answered {response.status_code} to "
                f"{what} {_times(attempts)}: {excerpt(response.text) or '(empty body)'}; "
                f"{hint}. Check the {self.service.name}'s health."
            )
        if isinstance(exc, httpx.HTTPError):
            if isinstance(exc, NOT_SENT_ERRORS) or idempotent:
                hint = "the transport already retried"
            else:
                hint = _not_resent(method, path)
            return self.service.unavailable(
                f"{self.service.name} at {self.shown_url}: {what} failed {_times(attempts)} "
                f"({_short(exc)}); {hint}. Check that the {self.service.name} is running and "
                "reachable."
            )
        return exc

    def _answer(self, what: str, response: httpx.Response) -> tuple[int, Any]:
        status = response.status_code
        if status >= 500:
            self.breaker.record_failure(f"{what}: HTTP {status}")
            raise self.service.error(
                f"{self.service.name} at {self.shown_url} answered {status} to {what}: "
                f"{excerpt(response.text) or '(empty body)'}"
            )
        if status in (401, 403):
            self.breaker.record_success()  # it answered: the endpoint is up, our token is not
            raise self.service.error(
                f"{self.service.name} refused the token ({status}): check {self.service.token_hint}"
            )
        if status == 404:
            self.breaker.record_success()
            return status, _try_json(response)
        if status >= 400:
            self.breaker.record_success()
            raise self.service.error(
                f"{self.service.name} at {self.shown_url} rejected {what} with {status}: "
                f"{excerpt(response.text) or '(empty body)'}"
            )
        try:
            parsed = response.json()
        except UNPARSABLE:
            self.breaker.record_failure(f"{what}: malformed JSON")
            raise self.service.error(
                f"{self.service.name} at {self.shown_url} answered {what} with malformed JSON "
                f"(HTTP {status}): {excerpt(response.text) or '(empty body)'!r}"
            ) from None
        self.breaker.record_success()
        return status, parsed


class EndpointOptions(TypedDict, total=False):
    """How a ServiceClient reaches its service; every field has a default."""

    allow_insecure: bool  # plain http:// beyond loopback (default False)
    timeout: float  # seconds per request (default 30)
    client: httpx.AsyncClient | None  # a caller-owned client (tests: a MockTransport)
    breaker: CircuitBreaker | None  # default: the shared breaker of the endpoint
    clock: Clock | None  # default: the system clock
    retry: RetryPolicy | None  # default: RetryPolicy()


class ServiceClient:
    """A client of one JSON service (AuraGateway, Hydra): its endpoint, breaker and closing.

    Subclasses name their `service` and add the calls; the transport policy is all here.
    """

    service: ServiceInfo

    def __init__(
        self, base_url: str, token: SecretStr | None = None, **options: Unpack[EndpointOptions]
    ):
        self.clock = options.get("clock") or SystemClock()
        self._http = JsonEndpoint(
            self.service,
            base_url,
            token,
            allow_insecure=options.get("allow_insecure", False),
            timeout=options.get("timeout", 30),
            async_client=options.get("client"),
            breaker=options.get("breaker"),
            clock=self.clock,
            policy=options.get("retry"),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._http.shown_url!r})"

    @property
    def breaker(self) -> CircuitBreaker:
        return self._http.breaker

    def close(self) -> None:
        self._http.close()

    async def aclose(self) -> None:
        await self._http.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _raise_transient(response: httpx.Response) -> httpx.Response:
    if response.status_code in TRANSIENT_STATUS:
        raise _TransientStatus(response)
    return response


def _not_resent(method: str, path: str) -> str:
    return (
        f"not retried: {method} {path} starts work and may have reached the server, so "
        "check there before sending it again"
    )


def _times(attempts: int) -> str:
    return "after 1 attempt" if attempts == 1 else f"after {attempts} attempts"


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {excerpt(text, 120)}" if str(exc) else type(exc).__name__


def _try_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except UNPARSABLE:
        return None
