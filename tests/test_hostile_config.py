"""Hostile fleet files through the real `fleet check-config`: refused fast, in one line, small."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.configfile import MAX_CONFIG_BYTES, MAX_DEPTH, MAX_VALUES

FLEET = str(Path(sys.executable).with_name("fleet"))
MEMORY_LIMIT = 512 << 20
# Generous for a loaded 2-core machine: the CLI's imports take most of it; a bomb took 18 s.
TIMEOUT = 60

COMMANDS = """\
commands:
  skill: [agent, skill]
  review: [agent, review]
  evolve: [agent, evolve]
  ship: [agent, ship]
"""


def _bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


DEEP = f"nested more than {MAX_DEPTH} levels"
HOSTILE = {
    "bomb": (_bomb(), f"more than {MAX_VALUES} values once YAML aliases are expanded"),
    "deep-flow": ("name: " + "[" * 100_000 + "]" * 100_000 + "\n", DEEP),
    "deep-map": ("name: " + "{a: " * 100_000 + "1" + "}" * 100_000 + "\n", DEEP),
    "alias-loop": ("a: &a [1, *a]\n", "alias *a is used inside the value it names"),
    "alias-deep": (
        "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 2000)),
        DEEP,
    ),
    "huge-file": ("name: " + "x" * 5_000_000 + "\n", f"over {MAX_CONFIG_BYTES} bytes"),
    "huge-name": (f"name: {'x' * 200_000}\n{COMMANDS}apps: [{{id: a}}]\n", "name: 'xxxxxxxx"),
    "huge-int": ("name: " + "9" * 5000 + "\n", "cannot be read: Exceeds the limit"),
    "traversal": (
        f"{COMMANDS}apps:\n  - id: a\n    repo: ../../../../etc\n",
        "apps[0].repo: '../../../../etc' resolves outside",
    ),
    "absolute": (
        f"{COMMANDS}apps:\n  - id: a\n    repo: /etc\n",
        "apps[0].repo: '/etc' resolves outside",
    ),
    "many-args": (
        COMMANDS.replace("[agent, skill]", "[" + ", ".join(["a"] * 10_000) + "]")
        + "apps: [{id: a}]\n",
        "commands.skill: ",
    ),
    "fleet-secret": (
        f"{COMMANDS}env: {{pass: [FLEET_STORE_URL]}}\napps: [{{id: a}}]\n",
        "FLEET_STORE_URL is the orchestrator's own setting",
    ),
    "literal-secret": (
        f"{COMMANDS}env: {{set: {{GEMINI_API_KEY: abc}}}}\napps: [{{id: a}}]\n",
        "GEMINI_API_KEY looks like a secret",
    ),
}


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FLEET, "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=_limit_memory,
        env={"PATH": "/usr/bin:/bin", "HOME": str(path.parent), "COLUMNS": "100000"},
    )


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_fleet_file_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    text, expected = HOSTILE[name]
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    done = check_config(path)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-2000:]
    assert "Traceback" not in out and "MemoryError" not in out
    (line,) = out.strip().splitlines()
    assert line.startswith(f"error: {path}"), line[:300]
    assert expected in line, line[:300]
    assert len(line) < 400


def test_the_demo_fleet_still_passes(tmp_path: Path) -> None:
    from fleet.demo import create_demo_fleet

    done = check_config(create_demo_fleet(tmp_path / "demo"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
