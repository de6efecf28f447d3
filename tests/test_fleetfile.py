"""The fleet file: validation with file:line errors, command rendering without a shell."""

from __future__ import annotations

import pytest

from fleet.errors import ConfigError
from fleet.fleetfile import load_fleet, render

GOOD = """\
name: test
commands:
  skill: [agent, skill, "{repo}", "{prompt}"]
  review: [agent, review, "{app_id}"]
  evolve: [agent, evolve]
  ship: [agent, ship]
apps:
  - id: app-one
    repo: repos/app-one
    check: [make, test]
"""


def test_loads_and_resolves_repo_relative_to_file(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(GOOD)
    fleet = load_fleet(path)
    assert fleet.app_ids == ["app-one"]
    assert fleet.app("app-one").repo == (tmp_path / "repos" / "app-one").resolve()


def test_unknown_key_names_file_line_and_allowed_keys(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(GOOD + "    colour: blue\n")
    with pytest.raises(ConfigError) as err:
        load_fleet(path)
    msg = str(err.value)
    assert msg == (
        f"{path}:11: apps[0].colour: unknown key 'colour'; "
        "expected one of id, repo, check, protected, pipeline"
    )


def test_bad_app_id_names_its_line(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(GOOD.replace("id: app-one", "id: 'App One; rm -rf /'"))
    with pytest.raises(ConfigError) as err:
        load_fleet(path)
    assert f"{path}:8: apps[0].id:" in str(err.value) and "[a-z0-9._-]" in str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("commands: [unclosed\n")
    with pytest.raises(ConfigError, match=r"fleet.yaml:\d+: invalid YAML"):
        load_fleet(path)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read the fleet file: No such file"):
        load_fleet(tmp_path / "missing.yaml")


def test_duplicate_ids_refused(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(GOOD + "  - id: app-one\n")
    with pytest.raises(ConfigError, match="appears twice"):
        load_fleet(path)


def test_render_fills_one_argument_each_and_never_rereads_values():
    argv = render(
        ["run", "{app_id}", "--repo={repo}", "{prompt}"],
        app_id="a",
        repo="/x/{prompt}",
        prompt="$(rm -rf /); `id` {app_id}",
    )
    assert argv == ["run", "a", "--repo=/x/{prompt}", "$(rm -rf /); `id` {app_id}"]


def test_render_drops_an_empty_placeholder_argument():
    assert render(["skill", "{repo}", "{prompt}"], repo="/r", prompt="") == ["skill", "/r"]


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys silently: an operator's first value would vanish."""
    path = tmp_path / "fleet.yaml"
    path.write_text(
        GOOD.replace("  ship: [agent, ship]\n", "  ship: [agent, ship]\n  skill: [other]\n")
    )
    with pytest.raises(ConfigError) as err:
        load_fleet(path)
    assert str(err.value) == f"{path}:7: commands.skill: given twice (first on line 3); keep one"


def _write(tmp_path, text: str):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_repo_root_lets_repos_live_elsewhere(tmp_path):
    (tmp_path / "code" / "app-one").mkdir(parents=True)
    (tmp_path / "fleets").mkdir()
    text = GOOD.replace("repo: repos/app-one", "repo: ../code/app-one")
    outside = r"fleet.yaml:9: apps\[0\].repo: '../code/app-one' resolves outside"
    with pytest.raises(ConfigError, match=outside):
        load_fleet(_write(tmp_path / "fleets", text))
    fleet = load_fleet(_write(tmp_path / "fleets", "repo_root: ../code\n" + text))
    assert fleet.app("app-one").repo == (tmp_path / "code" / "app-one").resolve()
    assert fleet.repo_root == (tmp_path / "code").resolve()


def test_a_symlinked_repo_is_judged_by_where_it_leads(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "fleet" / "repos").mkdir(parents=True)
    (tmp_path / "fleet" / "repos" / "app-one").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="resolves outside"):
        load_fleet(_write(tmp_path / "fleet", GOOD))


def test_field_lengths_are_bounded(tmp_path):
    too_long = {
        "name: test": f"name: {'n' * 65}",
        "    check: [make, test]": "    check: [" + ", ".join(["x"] * 65) + "]",
        "  ship: [agent, ship]": f"  ship: [agent, {'s' * 5000}]",
        "    repo: repos/app-one": f"    repo: {'r' * 1100}",
    }
    for old, new in too_long.items():
        with pytest.raises(ConfigError) as err:
            load_fleet(_write(tmp_path, GOOD.replace(old, new)))
        (line,) = str(err.value).splitlines()
        assert len(line) < 300, line


def test_many_problems_are_listed_up_to_a_bound(tmp_path):
    apps = "".join(f"  - id: 'Bad {i}'\n" for i in range(100))
    with pytest.raises(ConfigError) as err:
        load_fleet(_write(tmp_path, GOOD.split("apps:")[0] + "apps:\n" + apps))
    lines = str(err.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 80 more problems"


def test_ordinary_aliases_still_work(tmp_path):
    text = GOOD.replace("  skill: [agent, skill", "  skill: &agent [agent, skill").replace(
        "  evolve: [agent, evolve]", "  evolve: *agent"
    )
    fleet = load_fleet(_write(tmp_path, text))
    assert fleet.commands.evolve == fleet.commands.skill


def test_env_passes_named_variables_and_fixed_values_only(tmp_path):
    fleet = load_fleet(
        _write(tmp_path, GOOD + "env:\n  pass: [ANTHROPIC_API_KEY, MISSING]\n  set: {CI: '1'}\n")
    )
    base = {
        "PATH": "/bin",
        "HOME": "/h",
        "LC_ALL": "C",
        "ANTHROPIC_API_KEY": "k",
        "GEMINI_API_KEY": "g",
        "FLEET_AURA_TOKEN": "t",
        "OTHER": "o",
    }
    assert fleet.agent_env(base) == {
        "PATH": "/bin",
        "HOME": "/h",
        "LC_ALL": "C",
        "ANTHROPIC_API_KEY": "k",
        "CI": "1",
    }


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ("{pass: [FLEET_STORE_URL]}", "FLEET_STORE_URL is the orchestrator's own setting"),
        ("{pass: [prefect_api_key]}", "prefect_api_key is the orchestrator's own setting"),
        ("{pass: ['A B']}", "'A B' is not an environment variable name"),
        ("{set: {GITHUB_TOKEN: x}}", "GITHUB_TOKEN looks like a secret"),
        (
            "{set: {MIRROR: 'postgresql://u:pw@db/x'}}",
            "the value of MIRROR is a URL with a password",
        ),
        ("{pass: [CI], set: {CI: '1'}}", "CI given under both pass and set"),
    ],
)
def test_env_refuses_secrets_in_the_file_and_the_orchestrators_own(tmp_path, env, reason):
    with pytest.raises(ConfigError) as err:
        load_fleet(_write(tmp_path, GOOD + f"env: {env}\n"))
    assert reason in str(err.value)
