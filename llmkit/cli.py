"""Console entry points: ``llmkit-serve`` (the server) and ``llmkit`` (the tool)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llmkit import __version__
from llmkit.config import ConfigError, load_config


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``llmkit-serve``: run the supervisor and its workers until SIGTERM/SIGINT."""
    args = _serve_parser().parse_args(argv)
    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "server.workers": args.workers,
        "server.uds": args.uds,
        "server.shm_name": args.shm_name,
        "server.log_level": args.log_level,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"llmkit-serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    from workers.supervisor import Supervisor

    return Supervisor(config, args.config, overrides).run()


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmkit-serve",
        description="Run the LLMKit gateway: a supervisor and one uvloop worker per core.",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config (DESIGN.md §8)")
    parser.add_argument("--host", help="address to listen on (server.host)")
    parser.add_argument("--port", "-p", type=int, help="TCP port; 0 picks a free one")
    parser.add_argument("--workers", "-w", type=int, help="worker processes; 0 = one per core")
    parser.add_argument("--uds", metavar="PATH", help="also serve on this Unix socket (0600)")
    parser.add_argument("--shm-name", metavar="NAME", help="shared-memory segment name")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="server.log_level"
    )
    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``llmkit``: inspect configuration and the running server."""
    parser = argparse.ArgumentParser(prog="llmkit", description="LLMKit command line.")
    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    config_cmd = commands.add_parser("config", help="configuration files")
    config_sub = config_cmd.add_subparsers(dest="action", required=True)
    check = config_sub.add_parser("check", help="validate a config file; exit 2 if invalid")
    check.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "config" and args.action == "check":
        return _config_check(args.file)
    parser.error("unknown command")
    return 2


def _config_check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"llmkit: {exc}", file=sys.stderr)
        return 2
    deployments = len(config.deployments())
    print(f"{path}: ok ({len(config.models)} models, {deployments} deployments)")
    return 0
