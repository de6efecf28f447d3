"""GeminiExtractor at the HTTP layer: google-genai talks to an httpx.MockTransport, REST bodies."""

from __future__ import annotations

import json
import logging
import uuid

import httpx
import pytest
from pydantic import SecretStr

from fleet.clients.base import Extractor
from fleet.clients.breaker import CircuitBreaker
from fleet.clients.gemini import GeminiExtractor
from fleet.clock import ManualClock
from fleet.errors import ConfigError, ExtractionError

KEY = "AIza-test-" + uuid.uuid4().hex  # unique, so a leak is unmistakable
MODEL = "gemini-test-flash-" + uuid.uuid4().hex[:6]  # from config, never a name baked into code

SKILL_OUTPUT = """Reviewed the app. The login screen crashes on iPad rotation (LoginView.swift).
Also the settings toggle does not persist, and the onboarding copy has typos."""

TASKS = [
    {
        "priority": 1,
        "description": "Fix the iPad rotation crash on the login screen.",
        "source": "skill",
        "file": "LoginView.swift",
    },
    {
        "priority": 2,
        "description": "Persist the settings toggle across launches.",
        "source": "skill",
    },
    {"priority": 5, "description": "Fix typos in the onboarding copy.", "source": "skill"},
]


def gemini_body(text: str | None, finish: str = "STOP") -> dict:
    """A generateContent answer as the REST API sends it."""
    candidate: dict = {"finishReason": finish, "index": 0}
    if text is not None:
        candidate["content"] = {"parts": [{"text": text}], "role": "model"}
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": 412,
            "candidatesTokenCount": 96,
            "totalTokenCount": 508,
        },
        "modelVersion": MODEL,
        "responseId": "resp-" + uuid.uuid4().hex[:8],
    }


def api_error(code: int, status: str, message: str) -> httpx.Response:
    return httpx.Response(
        code, json={"error": {"code": code, "message": message, "status": status}}
    )


class FakeGemini:
    """Records requests; answers from a script of responses (the last one repeats)."""

    def __init__(self, *responses: httpx.Response):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]

    @property
    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]


@pytest.fixture
def sleeps():
    return []


def extractor(fake: FakeGemini, sleeps: list, **kw) -> GeminiExtractor:
    kw.setdefault(
        "breaker", CircuitBreaker(f"gemini-test-{uuid.uuid4().hex[:8]}", 2, 60, ManualClock())
    )
    return GeminiExtractor(
        SecretStr(KEY), MODEL, transport=httpx.MockTransport(fake), sleep=sleeps.append, **kw
    )


def test_is_an_extractor(sleeps):
    assert isinstance(
        extractor(FakeGemini(httpx.Response(200, json=gemini_body("[]"))), sleeps), Extractor
    )


async def test_extracts_tasks_and_sends_model_schema_and_key_header(sleeps):
    fake = FakeGemini(httpx.Response(200, json=gemini_body(json.dumps(TASKS))))
    tasks = await extractor(fake, sleeps).extract(SKILL_OUTPUT, "habit-tracker")
    assert tasks == TASKS

    (request,) = fake.requests
    assert request.url.path.endswith(f"/models/{MODEL}:generateContent")
    assert request.headers["x-goog-api-key"] == KEY
    assert KEY not in str(request.url)
    body = fake.bodies[0]
    prompt = body["contents"][0]["parts"][0]["text"]
    assert "Extract all actionable tasks from this output" in prompt
    assert "habit-tracker" in prompt and "iPad rotation" in prompt
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = config["responseSchema"]
    assert schema["type"] == "ARRAY"
    item = schema["items"]
    assert set(item["required"]) == {"priority", "description"}
    assert item["properties"]["priority"]["minimum"] == 1
    assert item["properties"]["priority"]["maximum"] == 5
    assert item["properties"]["source"]["enum"] == ["skill"]
    assert "file" in item["properties"]


async def test_parsed_none_falls_back_to_the_text_and_keeps_valid_items(sleeps, caplog):
    # One item out of range makes the SDK's `parsed` None for the whole answer.
    text = json.dumps([{"priority": 9, "description": "Out of range."}, TASKS[1]])
    fake = FakeGemini(httpx.Response(200, json=gemini_body(text)))
    assert await extractor(fake, sleeps).extract(SKILL_OUTPUT, "app1") == [TASKS[1]]
    assert "dropped 1 item" in caplog.text


async def test_fenced_json_text_is_accepted(sleeps):
    text = "```json\n" + json.dumps(TASKS[:1]) + "\n```"
    fake = FakeGemini(httpx.Response(200, json=gemini_body(text)))
    assert await extractor(fake, sleeps).extract(SKILL_OUTPUT, "app1") == TASKS[:1]


async def test_non_json_answer_gives_no_tasks_and_says_why(sleeps, caplog):
    fake = FakeGemini(httpx.Response(200, json=gemini_body("Sure! Here are the tasks: fix it")))
    with caplog.at_level(logging.INFO, logger="fleet.gemini"):
        assert await extractor(fake, sleeps).extract(SKILL_OUTPUT, "app1") == []
    assert "not JSON" in caplog.text


async def test_blocked_prompt_gives_no_tasks_and_says_why(sleeps, caplog):
    fake = FakeGemini(httpx.Response(200, json={"promptFeedback": {"blockReason": "SAFETY"}}))
    assert await extractor(fake, sleeps).extract(SKILL_OUTPUT, "app1") == []
    assert "SAFETY" in caplog.text


async def test_truncated_answer_gives_no_tasks(sleeps, caplog):
    fake = FakeGemini(
        httpx.Response(200, json=gemini_body('[{"priority": 1, "descr', finish="MAX_TOKENS"))
    )
    assert await extractor(fake, sleeps).extract(SKILL_OUTPUT, "app1") == []
    assert "not JSON" in caplog.text


async def test_empty_output_is_not_sent(sleeps):
    fake = FakeGemini(httpx.Response(200, json=gemini_body("[]")))
    assert await extractor(fake, sleeps).extract("   \n", "app1") == []
    assert fake.requests == []


async def test_huge_output_is_cut_in_the_middle(sleeps):
    fake = FakeGemini(httpx.Response(200, json=gemini_body("[]")))
    output = "HEAD " + "x" * 5000 + " TAIL"
    await extractor(fake, sleeps, max_input_chars=1000).extract(output, "app1")
    prompt = fake.bodies[0]["contents"][0]["parts"][0]["text"]
    assert "HEAD" in prompt and "TAIL" in prompt and "omitted" in prompt
    assert len(prompt) < 2000


async def test_503_then_success_is_retried_once_through_the_injected_sleep(sleeps):
    fake = FakeGemini(
        api_error(503, "UNAVAILABLE", "The model is overloaded."),
        httpx.Response(200, json=gemini_body(json.dumps(TASKS))),
    )
    assert len(await extractor(fake, sleeps).extract(SKILL_OUTPUT, "app1")) == 3
    assert len(fake.requests) == 2 and len(sleeps) == 1


async def test_rate_limit_storm_fails_after_bounded_attempts_and_opens_the_breaker(sleeps):
    fake = FakeGemini(api_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded."))
    gem = extractor(fake, sleeps)
    for _ in range(2):
        with pytest.raises(ExtractionError, match="HTTP 429 after 3 attempt"):
            await gem.extract(SKILL_OUTPUT, "app1")
    assert len(fake.requests) == 6 and sum(sleeps) <= 5
    with pytest.raises(ExtractionError, match="circuit breaker"):
        await gem.extract(SKILL_OUTPUT, "app1")
    assert len(fake.requests) == 6


async def test_invalid_key_is_clear_and_never_shown(sleeps, caplog):
    fake = FakeGemini(
        api_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
    )
    gem = extractor(fake, sleeps)
    with caplog.at_level(logging.DEBUG), pytest.raises(ExtractionError) as err:
        await gem.extract(SKILL_OUTPUT, "app1")
    assert (
        str(err.value)
        == "Gemini refused the API key (400): check the Gemini block / FLEET_GEMINI_API_KEY"
    )
    assert len(fake.requests) == 1  # a refused key is not retried
    for shown in (str(err.value), repr(err.value), repr(gem), caplog.text):
        assert KEY not in shown


async def test_unknown_model_names_the_setting(sleeps):
    fake = FakeGemini(
        api_error(404, "NOT_FOUND", f"models/{MODEL} is not found for API version v1")
    )
    with pytest.raises(ExtractionError, match="FLEET_GEMINI_MODEL"):
        await extractor(fake, sleeps).extract(SKILL_OUTPUT, "app1")


async def test_network_timeout_is_retried_then_reported(sleeps):
    calls = []

    def handler(request):
        calls.append(request)
        raise httpx.ReadTimeout("timed out", request=request)

    gem = GeminiExtractor(
        SecretStr(KEY),
        MODEL,
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
        breaker=CircuitBreaker(f"gemini-test-{uuid.uuid4().hex[:8]}", 5, 60, ManualClock()),
    )
    with pytest.raises(ExtractionError, match="after 3 attempt.*ReadTimeout"):
        await gem.extract(SKILL_OUTPUT, "app1")
    assert len(calls) == 3


def test_configuration_is_required():
    with pytest.raises(ConfigError, match="FLEET_GEMINI_MODEL"):
        GeminiExtractor(SecretStr(KEY), "")
    with pytest.raises(ConfigError, match="FLEET_GEMINI_API_KEY"):
        GeminiExtractor(SecretStr(" "), MODEL)
    with pytest.raises(TypeError, match="SecretStr"):
        GeminiExtractor(KEY, MODEL)  # type: ignore[arg-type]


def test_block_keeps_the_key_secret_and_builds_the_extractor():
    from blocks.integrations import GeminiBlock

    block = GeminiBlock(api_key=SecretStr(KEY), model=MODEL)
    for shown in (repr(block), str(block), str(block.model_dump()), block.model_dump_json()):
        assert KEY not in shown
    gem = block.get_client()
    assert isinstance(gem, GeminiExtractor) and gem.model == MODEL
    assert KEY not in repr(gem)
