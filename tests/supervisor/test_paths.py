"""Protected-path globs on pathspec: gitignore semantics, and where the guard protects more."""

from __future__ import annotations

import pytest

from fleet.supervisor.paths import ProtectedPaths


@pytest.mark.parametrize(
    ("glob", "path", "protected"),
    [
        ("/ci", "ci/x", True),
        ("/ci", "sub/ci/x", False),  # a leading "/" anchors
        ("ci", "sub/ci/x", True),
        ("docs/ci", "sub/docs/ci", False),  # an inner "/" anchors too
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("**/gate.sh", "x/y/gate.sh", True),
        ("*.py", "src/deep/m.py", True),
        ("src/*.py", "src/deep/m.py", False),
        ("[ab].txt", "b.txt", True),
        ("[!a].txt", "a.txt", False),
        ("?.cfg", "ab.cfg", False),
        ("*.Lock", "a.lock", False),  # case counts, as in git on Linux
    ],
)
def test_gitignore_semantics(glob, path, protected):
    assert ProtectedPaths([glob]).matches(path) is protected


@pytest.mark.parametrize(
    ("glob", "path"),
    [
        ("ci/**", "ci"),
        ("backend/supervisor/", "backend/supervisor"),
        ("ci/", "ci"),
        ("dir/*/", "dir/x"),
    ],
)
def test_a_glob_for_a_directory_protects_the_path_whether_file_or_directory(glob, path):
    # git reads "dir/" as directories only; the guard cannot tell what the agent left at `path`.
    assert ProtectedPaths([glob]).matches(path)


def test_a_newline_in_a_directory_name_hides_nothing():
    # pathspec's "." stops at a newline; a directory named "a\nb" must not shield the files below.
    paths = ProtectedPaths(["*.lock", "ci", "a/**/b"])
    assert paths.matches("x\ny/deps.lock") and paths.matches("weird\nname/ci/gate.sh")
    assert paths.matches("a/q\nr/b") and not paths.matches("x\ny/app.py")


def test_negation_and_comment_marks_are_names_and_never_lift_a_protection():
    paths = ProtectedPaths(["!supervisor.yaml", "#notes", "!.gitattributes"])
    assert paths.matches("supervisor.yaml") and paths.matches("x/.gitattributes")
    assert paths.matches("!supervisor.yaml") and paths.matches("#notes")


def test_an_unclosed_bracket_is_a_literal_character():
    assert ProtectedPaths(["x["]).matches("x[") and not ProtectedPaths(["x["]).matches("x")


def test_backslashes_and_dot_slash_are_read_as_paths():
    assert ProtectedPaths(["ci\\sub"]).matches("ci/sub/gate.sh")
    assert ProtectedPaths(["./ci"]).matches("ci/gate.sh")
    assert ProtectedPaths(["  deps.lock  "]).matches("deps.lock")


def test_globs_are_listed_once_with_the_always_protected_first():
    paths = ProtectedPaths(["ci/**", "ci/**", " ", "supervisor.yaml"])
    assert paths.globs == (
        "supervisor.yaml",
        "supervisor.yml",
        ".fleet-supervisor/**",
        ".gitattributes",
        "ci/**",
    )
