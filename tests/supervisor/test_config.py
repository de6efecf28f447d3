"""supervisor.yaml validation: errors name the file, line, key path and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.errors import ConfigError
from fleet.supervisor.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "supervisor.yaml"

GOOD = """\
status_port: 0
processes:
  - name: mcp
    command: [python3, server.py]
    restart: always
  - name: agent
    command: [fleet, agent]
    restart: sometimes
    cwd: work
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "supervisor.yaml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_example_config_is_valid():
    config = load_config(EXAMPLE)
    assert [p.name for p in config.processes] == ["dynamic-thinking", "node-agent"]
    assert config.processes[0].intensity.max_restarts == 5
    assert config.processes[1].restart == "on-failure" and config.processes[1].log_file is None


def test_bad_enum_value_names_file_line_path_and_choices(tmp_path):
    path = write(tmp_path, GOOD)
    assert (
        error_of(path)
        == f"{path}:8: processes[1].restart: 'sometimes' is not one of always, on-failure, never"
    )


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path):
    path = write(
        tmp_path,
        GOOD.replace("sometimes", "always").replace("    cwd: work", "    restart_policy: x"),
    )
    message = error_of(path)
    assert message.startswith(
        f"{path}:9: processes[1].restart_policy: unknown key 'restart_policy';"
        " expected one of name, command"
    )


def test_nested_errors_missing_keys_and_ranges(tmp_path):
    text = """\
processes:
  - name: mcp
    backoff:
      initial_seconds: -1
  - name: bad name!
    command: python3 server.py
"""
    lines = error_of(write(tmp_path, text)).splitlines()
    assert lines[0].endswith(":2: processes[0]: missing required key 'command'")
    assert lines[1].endswith(
        ":4: processes[0].backoff.initial_seconds: -1 is not valid: input should be greater than 0"
    )
    assert any(
        line.endswith(
            ":5: processes[1].name: 'bad name!' is not valid: "
            "string should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'"
        )
        for line in lines
    )
    assert lines[-1].endswith(
        ":6: processes[1].command: 'python3 server.py' is not a list of arguments; "
        "write it as an argv list, e.g. [python, server.py]"
    )


def test_duplicate_names_and_bad_yaml(tmp_path):
    dup = "processes:\n  - {name: a, command: [x]}\n  - {name: a, command: [y]}\n"
    assert error_of(write(tmp_path, dup)).endswith(
        ":3: processes[1].name: duplicate process name 'a' (first at processes[0]);"
        " names must be unique"
    )
    broken = "processes:\n  - name: a\n   command: [x]\n"
    assert ":3: invalid YAML: " in error_of(write(tmp_path, broken))
    assert error_of(write(tmp_path, "- a\n- b\n")).endswith(
        ":1: expected a mapping of settings at the top level, got list"
    )
    assert "cannot read the supervisor config" in error_of(tmp_path / "missing.yaml")


def test_relative_paths_are_relative_to_the_file(tmp_path):
    config = load_config(
        write(tmp_path, GOOD.replace("sometimes", "never") + "    log_file: logs/agent.log\n")
    )
    assert config.processes[1].cwd == tmp_path / "work"
    assert config.processes[1].log_file == tmp_path / "logs" / "agent.log"
    assert config.processes[0].cwd is None
    assert load_config(write(tmp_path, "")).processes == []


def test_a_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path, "status_port: 9000\nstatus_port: 1\n")
    assert error_of(path) == f"{path}:2: status_port: given twice (first on line 1); keep one"


def test_app_keep_commits_and_health_are_read_and_checked(tmp_path):
    text = (
        "app:\n  repo: .\n  command: [python3, app.py]\n"
        "  keep_commits: 3\n  health: {max_memory_mb: 512}\n"
    )
    app = load_config(write(tmp_path, text)).app
    assert app.keep_commits == 3 and app.health.max_memory_mb == 512
    assert app.health.max_cpu_percent == 90 and app.health.interval_seconds == 5  # the others stay
    path = write(tmp_path, text.replace("keep_commits: 3", "keep_commits: 0"))
    assert error_of(path).startswith(f"{path}:4: app.keep_commits: 0 is not valid: ")
