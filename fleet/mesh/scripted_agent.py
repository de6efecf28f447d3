"""A scripted stand-in for Claude Code in a pane: acknowledges every line and finishes TASK lines.

Protocol (one line in, a few marker lines out):
  any line                  → "ACK <sha1 of the line's UTF-8 bytes>"
  "TASK <id> <payload>"     → ACK, "context: N%", then by payload:
        starts with "hang"  → nothing more (a task that never finishes)
        starts with "fail"  → "FAILED <id> <rest of payload>"
        "flaky <file> <why>" → the first time (no <file> yet: it is made) "FAILED <id> <why>",
                               then as anything else
        starts with "exit"  → the program exits with status 3 (a crashing agent)
        anything else       → "OUTPUT <id> <payload>" and "DONE <id>"
Options: --exit-after N (exit after N tasks), --context-start P, --context-step P (percent per
task), --hang (never finish any task), --linger S (seconds to wait before exiting).

Before it exits it lingers a moment, as a real agent's shutdown does. Linux hands pty output to
the master side through a work queue, so a process that writes and exits at once can have its
last lines lost: tmux may mark the pane dead before it has read them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from fleet.mesh import END_PROTOCOL


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripted_agent", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--exit-after", type=int, default=0, help="exit after N task lines (0 = never)"
    )
    parser.add_argument("--context-start", type=float, default=42.0)
    parser.add_argument(
        "--context-step", type=float, default=0.0, help="context percent used per task"
    )
    parser.add_argument("--hang", action="store_true", help="never finish a task")
    parser.add_argument("--linger", type=float, default=0.3, help="seconds to wait before exiting")
    args = parser.parse_args(argv)

    def leave(code: int) -> int:
        time.sleep(args.linger)
        return code

    context = args.context_start
    tasks = 0
    _say("scripted agent ready")
    _say(f"context: {context:g}%")
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        _say(f"ACK {hashlib.sha1(line.encode('utf-8')).hexdigest()}")
        parts = line.split(" ", 2)
        if len(parts) < 2 or parts[0] != "TASK":
            continue
        task_id = parts[1]
        # Like an LLM agent, it reads the end-of-task instruction rather than doing it.
        payload = (parts[2] if len(parts) > 2 else "").removesuffix(END_PROTOCOL).strip()
        tasks += 1
        context = min(context + args.context_step, 100.0)
        _say(f"context: {context:g}%")
        if args.hang or payload.startswith("hang"):
            continue
        if payload.startswith("exit"):
            return leave(3)
        if payload.startswith("flaky "):
            marker, _, why = payload[6:].strip().partition(" ")
            if not os.path.exists(marker):
                open(marker, "w").close()
                _say(f"FAILED {task_id} {why.split(' [checkpoint:')[0] or 'flaky failure'}")
                continue
        if payload.startswith("fail"):
            _say(f"FAILED {task_id} {payload[4:].strip() or 'scripted failure'}")
        else:
            _say(f"OUTPUT {task_id} {payload}")
            _say(f"DONE {task_id}")
        if args.exit_after and tasks >= args.exit_after:
            return leave(0)
    return leave(0)


if __name__ == "__main__":
    raise SystemExit(run())
