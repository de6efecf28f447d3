"""`python -m fleet.devservers aura|hydra --port N`: run a dev server in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import threading

from fleet.agentenv import refusal
from fleet.clients.transport import is_loopback
from fleet.devservers.aura import AuraDevServer
from fleet.devservers.base import DevServer
from fleet.devservers.hydra import HydraDevServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.devservers",
        description="Local AuraGateway / Hydra stand-ins. Tokens are read from the environment, "
        "never from the command line (other users can read process arguments).",
    )
    sub = parser.add_subparsers(dest="server", required=True)

    aura = sub.add_parser("aura", help="AuraGateway-compatible server that runs commands here")
    aura.add_argument("--port", type=int, default=8001)
    aura.add_argument("--workdir", default=None, help="directory the commands run in")
    aura.add_argument(
        "--task-timeout", type=float, default=None, help="kill a command after N seconds"
    )
    aura.add_argument(
        "--token-env", default="FLEET_AURA_TOKEN", help="env var holding the bearer token"
    )

    hydra = sub.add_parser("hydra", help="Hydra-compatible quality-gate server")
    hydra.add_argument("--port", type=int, default=8095)
    hydra.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="APP_ID=COMMAND",
        help="run COMMAND (split like a shell would, but run without one) on each status read; "
        "exit 0 = passing. Repeatable.",
    )
    hydra.add_argument(
        "--passing", action="append", default=[], metavar="APP_ID", help="report APP_ID as passing"
    )
    hydra.add_argument(
        "--token-env", default="FLEET_HYDRA_TOKEN", help="env var holding the bearer token"
    )

    for p in (aura, hydra):
        p.add_argument(
            "--env",
            action="append",
            default=[],
            metavar="NAME[=VALUE]",
            help="give commands NAME (this process's value, or VALUE) besides the allowlist "
            "PATH, HOME, LANG, LC_*, TERM, TMPDIR. Repeatable; FLEET_*/PREFECT_* are refused.",
        )
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument(
            "--allow-remote",
            action="store_true",
            help="allow listening on a non-loopback address (needs a token; aura runs commands!)",
        )
        p.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    token = os.environ.get(args.token_env) or None
    env, problem = _command_env(args.env)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        if not args.allow_remote:
            print(
                f"refusing to listen on {args.host}: not a loopback address; pass --allow-remote",
                file=sys.stderr,
            )
            return 2
        if not token:
            print(
                f"refusing to listen on {args.host} without a token: set {args.token_env}",
                file=sys.stderr,
            )
            return 2
    server: DevServer
    if args.server == "aura":
        server = AuraDevServer(
            args.host,
            args.port,
            token,
            workdir=args.workdir,
            task_timeout=args.task_timeout,
            env=env,
        )
    else:
        hydra = server = HydraDevServer(args.host, args.port, token, env=env)
        for item in args.check:
            app_id, sep, command = item.partition("=")
            if not sep or not app_id or not command.strip():
                print(f"--check takes APP_ID=COMMAND, got {item!r}", file=sys.stderr)
                return 2
            hydra.set_check(app_id, shlex.split(command))
        for app_id in args.passing:
            hydra.set_status(app_id, phase="complete", is_passing=True, score=1.0)
    server.start()
    required = "required" if token else "off"
    print(
        f"{server.name} dev server on {server.url} (token {required}); Ctrl-C stops it", flush=True
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _command_env(items: list[str]) -> tuple[dict[str, str], str | None]:
    """--env NAME[=VALUE] items as the commands' extra environment, or a one-line refusal."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        reason = refusal(name, literal=bool(sep))
        if reason:
            return {}, f"--env {name}: {reason}"
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    return env, None


if __name__ == "__main__":
    sys.exit(main())
