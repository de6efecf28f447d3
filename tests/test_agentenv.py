"""The agent environment: an allowlist plus what the fleet file names, never our secrets."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from fleet.agentenv import AgentEnv, agent_env, allowed, refusal

CANARIES = {
    "GEMINI_API_KEY": "canary-gemini-key",
    "FLEET_AURA_TOKEN": "canary-aura-token",
    "FLEET_STORE_URL": "postgresql://u:canarypw@db.example/fleet",
    "PREFECT_API_KEY": "canary-prefect-key",
    "AWS_SECRET_ACCESS_KEY": "canary-aws",
    "DATABASE_URL": "postgresql://u:canarypw@db.example/app",
}
PARENT = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/op",
    "LANG": "C.UTF-8",
    "LC_ALL": "C",
    "TERM": "xterm",
    "TMPDIR": "/tmp",
    "EDITOR": "vi",
    **CANARIES,
}


def test_only_the_allowlist_passes_by_default() -> None:
    assert agent_env(base=PARENT) == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/op",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TERM": "xterm",
        "TMPDIR": "/tmp",
    }


def test_extra_is_added_as_given() -> None:
    env = agent_env({"CI": "1", "PATH": "/opt/bin"}, base=PARENT)
    assert env["CI"] == "1" and env["PATH"] == "/opt/bin"


def test_default_base_is_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    env = agent_env()
    assert not set(CANARIES) & set(env)
    assert env.get("PATH") == __import__("os").environ["PATH"]


def test_resolve_passes_named_values_that_exist_then_fixed_ones() -> None:
    spec = AgentEnv.model_validate({"pass": ["GEMINI_API_KEY", "NOT_SET"], "set": {"CI": "1"}})
    assert spec.resolve(PARENT) == {"GEMINI_API_KEY": "canary-gemini-key", "CI": "1"}
    assert AgentEnv().resolve(PARENT) == {}


@pytest.mark.parametrize("name", ["FLEET_AURA_TOKEN", "fleet_store_url", "PREFECT_API_URL"])
def test_the_orchestrators_own_names_are_refused_even_when_asked_for(name: str) -> None:
    assert "orchestrator's own setting" in (refusal(name, literal=False) or "")
    with pytest.raises(ValidationError):
        AgentEnv.model_validate({"pass": [name]})


@pytest.mark.parametrize(
    "name",
    [
        "GITHUB_TOKEN",
        "DB_PASSWORD",
        "OPENAI_API_KEY",
        "MY_SECRET",
        "AWS_ACCESS_KEY_ID",
        "SENTRY_DSN",
        "DATABASE_URL",
    ],
)
def test_secret_names_may_be_passed_but_not_written(name: str) -> None:
    assert refusal(name, literal=False) is None
    assert "looks like a secret" in (refusal(name, literal=True) or "")


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "X" * 129, "A=B"])
def test_malformed_names_are_refused(name: str) -> None:
    assert "not an environment variable name" in (refusal(name, literal=False) or "")


def test_ordinary_names_are_fine() -> None:
    for name in ("CI", "GIT_AUTHOR_NAME", "DEVELOPER_DIR", "XDG_CONFIG_HOME"):
        assert refusal(name, literal=True) is None
    assert allowed("LC_CTYPE") and not allowed("LD_PRELOAD")


def test_a_real_child_sees_no_canary() -> None:
    printed = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ.items()))"],
        env=agent_env(base={**PARENT, "PATH": __import__("os").environ["PATH"]}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for value in CANARIES.values():
        assert value not in printed and "canarypw" not in printed
