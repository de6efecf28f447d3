"""PARSE/REVIEW on 100 MB of agent output: seconds and peak RSS per case, each in a fresh process.

    uv run python bench/bench_parse.py                 # this checkout
    uv run python bench/bench_parse.py --compare /work/main   # and another checkout's parser

Targets (DESIGN §8): 100 MB parsed in <= 5 s and <= 300 MB peak RSS. Printed, not asserted.
The input string itself is part of the peak: "input MB" is the RSS once it is built; the
peak is reset then (Linux clear_refs), so building the input does not count. "cpu s" is the
parser's CPU time, steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
SIZE = 100 * MB

PROSE = "The view model keeps a strong reference to the session; see the notes below.\n"
ISSUE = "ISSUE FILE: Sources/F{n}.swift SEVERITY: high FIX: Release the session when done.\n"
BLOCK_ISSUE = (
    "### Issue {n}\n- **File:** Sources/B{n}.swift\n- **Severity:** medium\n- **Fix:** Do it.\n"
)
ANSI = "\x1b[32m{line}\x1b[0m"  # the line's {n} is filled later


def _repeat(unit: str, size: int) -> str:
    return unit * max(1, size // len(unit))


def _unique(unit: str, size: int) -> str:
    """`unit` (with an {n} in it) repeated up to `size`, each copy numbered apart."""
    return "".join(unit.format(n=n) for n in range(max(1, size // len(unit))))


def make_input(case: str) -> str:
    """The agent output of one case."""
    if case == "review-prose":  # a long review: prose, an ISSUE line every 200 lines, JSON
        tail = json.dumps({"issues": [{"file": "a.swift", "severity": "low", "description": "J."}]})
        return _unique(PROSE * 199 + ISSUE, SIZE) + tail
    if case == "review-all-issues":  # every line a distinct ISSUE: past the cap, only counted
        return _unique(ISSUE, SIZE)
    if case == "review-duplicates":  # one ISSUE line a million times: a flood of duplicates
        return _repeat(ISSUE.format(n="x"), SIZE)
    if case == "review-blocks":  # multi-line ISSUE blocks (a common LLM layout) among prose
        return _unique(PROSE * 50 + BLOCK_ISSUE, SIZE)
    if case == "review-terminal":  # a tmux capture: colour codes on every line
        return _unique(ANSI.format(line=PROSE) * 199 + ANSI.format(line=ISSUE), SIZE)
    if case == "skill-block-at-end":
        tasks = [{"priority": 2, "description": f"Task {n}."} for n in range(5)]
        block = f"<!-- EVOLUTION_TASKS_START -->\n{json.dumps(tasks)}\n<!-- EVOLUTION_TASKS_END -->"
        return _repeat(PROSE, SIZE) + block
    if case == "skill-12MB-block":  # over the 2 MB block cap
        tasks = [{"priority": 3, "description": f"Task {n} " + "y" * 200} for n in range(50_000)]
        body = json.dumps(tasks)[: 12 * MB]
        return "<!-- EVOLUTION_TASKS_START -->\n" + body + "\n<!-- EVOLUTION_TASKS_END -->"
    raise SystemExit(f"unknown case {case!r}")


CASES = [
    "review-prose",
    "review-all-issues",
    "review-duplicates",
    "review-blocks",
    "review-terminal",
    "skill-block-at-end",
    "skill-12MB-block",
]


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM (peak) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def child(case: str, checkout: str) -> None:
    """Run one case here (a fresh process) and print one JSON line."""
    sys.path.insert(0, checkout)
    from fleet.parsing import parse_review_output, parse_skill_output

    text = make_input(case)
    _reset_peak()
    base = _status_mb("VmRSS")
    began, cpu = time.perf_counter(), time.process_time()
    if case.startswith("review"):
        result = parse_review_output(text, "bench-app")
    else:
        result = parse_skill_output(text, "bench-app", max_tasks=500)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    print(
        json.dumps(
            {
                "case": case,
                "mb": round(len(text) / MB),
                "seconds": round(seconds, 2),
                "cpu": round(cpu, 2),
                "input_mb": round(base),
                "peak_mb": round(_status_mb("VmHWM")),
                "tasks": len(result),
                "dropped": result.dropped[:2],
            }
        )
    )


def run(case: str, checkout: str, timeout: float) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", case, "--checkout", checkout],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"over {timeout:g} s"}
    if done.returncode != 0:
        return {"case": case, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", help="another checkout whose fleet/parsing.py to run too")
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkout", default=str(ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.checkout)
    checkouts = [("this", str(ROOT))] + ([("compare", args.compare)] if args.compare else [])
    print(
        f"{'case':<20} {'checkout':<8} {'MB':>4} {'seconds':>8} {'cpu s':>6} {'input MB':>9} "
        f"{'peak MB':>8} {'tasks':>6}  dropped"
    )
    for case in args.cases:
        for label, checkout in checkouts:
            r = run(case, checkout, args.timeout)
            if "error" in r:
                print(f"{case:<20} {label:<8} error: {r['error']}")
                continue
            print(
                f"{case:<20} {label:<8} {r['mb']:>4} {r['seconds']:>8.2f} {r['cpu']:>6.2f} "
                f"{r['input_mb']:>9} {r['peak_mb']:>8} {r['tasks']:>6}  {r['dropped']}",
                flush=True,
            )
    print("targets: 100 MB in <= 5 s and <= 300 MB peak RSS (DESIGN §8)")


if __name__ == "__main__":
    main()
