"""`fresh` on the demo lays its repos out again (pure: real git repos in a temp dir)."""

from __future__ import annotations

import subprocess

from fleet.demo import create_demo_fleet, restore_demo_repo


def commits(repo) -> list[str]:
    out = subprocess.run(["git", "log", "--format=%s"], cwd=repo, capture_output=True, text=True)
    return out.stdout.splitlines()


def test_a_demo_repo_is_laid_out_again_from_its_template(tmp_path):
    create_demo_fleet(tmp_path / "demo")
    repo = tmp_path / "demo" / "repos" / "demo-calc"
    (repo / "FIXED").write_text("the first run's work\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fixed"],
        cwd=repo,
        check=True,
    )
    assert restore_demo_repo(repo)
    assert not (repo / "FIXED").exists()
    assert commits(repo) == ["demo app as the fleet found it"]


def test_a_repo_the_demo_did_not_make_is_left_alone(tmp_path):
    repo = tmp_path / "repos" / "demo-calc"  # a template's name, but no demo marker
    repo.mkdir(parents=True)
    (repo / "mine.txt").write_text("an operator's work\n")
    assert not restore_demo_repo(repo)
    assert (repo / "mine.txt").read_text() == "an operator's work\n"
