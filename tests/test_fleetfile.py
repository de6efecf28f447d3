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
    assert msg == (f"{path}:11: apps[0].colour: unknown key 'colour'; "
                   "expected one of id, repo, check, protected, pipeline")


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
    argv = render(["run", "{app_id}", "--repo={repo}", "{prompt}"],
                  app_id="a", repo="/x/{prompt}", prompt="$(rm -rf /); `id` {app_id}")
    assert argv == ["run", "a", "--repo=/x/{prompt}", "$(rm -rf /); `id` {app_id}"]


def test_render_drops_an_empty_placeholder_argument():
    assert render(["skill", "{repo}", "{prompt}"], repo="/r", prompt="") == ["skill", "/r"]


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys silently: an operator's first value would vanish."""
    path = tmp_path / "fleet.yaml"
    path.write_text(GOOD.replace("  ship: [agent, ship]\n", "  ship: [agent, ship]\n  skill: [other]\n"))
    with pytest.raises(ConfigError) as err:
        load_fleet(path)
    assert str(err.value) == f"{path}:7: commands.skill: given twice (first on line 3); keep one"
