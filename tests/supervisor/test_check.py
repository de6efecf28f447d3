"""The check after a change: pass, fail with the output's end, timeout, a missing program."""

from __future__ import annotations

import sys

from fleet.supervisor.check import TAIL_CHARS, run_check, tail


def test_a_passing_check_is_none(tmp_path):
    assert run_check([sys.executable, "-c", "print('ok')"], tmp_path, 30) is None


def test_a_failing_check_says_its_exit_and_the_end_of_its_output(tmp_path):
    failure = run_check(
        [sys.executable, "-c", "import sys; print('a\\n  b'); sys.exit(2)"], tmp_path, 30
    )
    assert failure == "exit 2: a b"
    assert (
        run_check([sys.executable, "-c", "raise SystemExit(1)"], tmp_path, 30)
        == "exit 1: (no output)"
    )


def test_a_check_that_hangs_is_stopped(tmp_path):
    hang = [sys.executable, "-c", "import time; print('stuck', flush=True); time.sleep(30)"]
    assert run_check(hang, tmp_path, 0.5).startswith("timed out after 0.5 s: ")


def test_a_check_that_cannot_start_is_one_line(tmp_path):
    failure = run_check([str(tmp_path / "nope")], tmp_path, 30)
    assert (
        failure.startswith(f"could not start {str(tmp_path / 'nope')!r}: ") and "\n" not in failure
    )


def test_tail_is_one_line_and_bounded():
    assert tail("x" * 1000 + "\n end ") == ("x" * 1000 + " end")[-TAIL_CHARS:]
