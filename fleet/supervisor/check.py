"""The check command run after an agent's change: bounded in time, its output's end kept."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fleet.procs import run_bounded

TAIL_CHARS = 240  # of a check's or agent's output, in a verdict or the status document


def run_check(argv: Sequence[str], cwd: Path, timeout: float) -> str | None:
    """Run the check; None when it passes, else why not ('exit 1: <tail>', 'timed out after …')."""
    try:
        done = run_bounded(argv, cwd=cwd, timeout=timeout)
    except OSError as exc:
        return f"could not start {argv[0]!r}: {exc.strerror or exc}"
    if done.timed_out:
        return f"timed out after {timeout:g} s: {tail(done.output_tail) or '(no output)'}"
    if done.returncode != 0:
        return f"exit {done.returncode}: {tail(done.output_tail) or '(no output)'}"
    return None


def tail(output: str) -> str:
    """The end of an output on one line (runs of whitespace as one space)."""
    return " ".join(output.split())[-TAIL_CHARS:]
