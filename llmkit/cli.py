"""Console entry points: ``llmkit-serve`` (the server) and ``llmkit`` (the tool)."""

from __future__ import annotations

import argparse
import logging
import os
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
    providers = commands.add_parser(
        "providers", help="list the provider catalog: wire format, base URL, key variable"
    )
    providers.add_argument("--config", "-c", metavar="FILE", help="apply this config's overrides")
    _add_client_commands(commands)
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except BrokenPipeError:  # `llmkit providers | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "config" and args.action == "check":
        return _config_check(args.file)
    if args.command == "providers":
        return _providers(args.config)
    if args.command in ("chat", "models", "state"):
        from llmkit import cli_client

        return cli_client.run(args)
    parser.error("unknown command")
    return 2


def _add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chat = commands.add_parser(
        "chat",
        help="send one prompt to a running server and stream the answer to stdout",
        description="Exit status: 0 answered, 1 the request failed, 2 usage or config error.",
    )
    chat.add_argument("prompt", help="the user message; '-' reads it from stdin")
    chat.add_argument("--model", "-m", required=True, help="model name or alias, e.g. demo/x")
    chat.add_argument("--system", "-s", help="a system message to send first")
    chat.add_argument("--max-tokens", type=int, help="limit the completion's length")
    chat.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    _add_connection_options(chat)
    models = commands.add_parser("models", help="list the model names the server answers to")
    _add_connection_options(models)
    state = commands.add_parser(
        "state",
        help="breakers, limit buckets and latency per deployment from /admin/state",
        description="Reads GET /admin/state over HTTP; it needs the master key.",
    )
    state.add_argument("--url", default=os.environ.get("LLMKIT_URL"),
                       help="server base URL (default: $LLMKIT_URL)")  # fmt: skip
    state.add_argument("--key", default=os.environ.get("LLMKIT_MASTER_KEY"),
                       help="master key (default: $LLMKIT_MASTER_KEY)")  # fmt: skip
    state.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="the server's Unix socket (default: $LLMKIT_SOCKET)")  # fmt: skip
    where.add_argument("--url", help="HTTP base URL instead of a socket (default: $LLMKIT_URL)")
    parser.add_argument("--key", default=os.environ.get("LLMKIT_API_KEY"),
                        help="API key (default: $LLMKIT_API_KEY)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")


def _providers(path: str | None) -> int:
    """One row per provider; whether its key is set, never the key."""
    from llmkit.providers.registry import build_providers, unusable

    try:
        providers = build_providers(load_config(path))
    except ConfigError as exc:
        print(f"llmkit: {exc}", file=sys.stderr)
        return 2
    rows = [("PROVIDER", "WIRE", "AUTH", "KEY VARIABLE", "READY", "BASE URL")]
    for p in sorted(providers.values(), key=lambda p: (p.wire != "demo", p.name)):
        key = f"{p.key_env} ({'set' if p.api_key else 'unset'})" if p.key_env else "-"
        ready = "no" if unusable(p) else "yes"
        url = p.base_url or ("(built in)" if p.wire == "demo" else "(set base_url)")
        rows.append((p.name, p.wire, p.auth, key, ready, url))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    print(f"\n{len(providers) - 1} providers in the catalog and config, plus the demo provider")
    return 0


def _config_check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"llmkit: {exc}", file=sys.stderr)
        return 2
    deployments = len(config.deployments())
    print(f"{path}: ok ({len(config.models)} models, {deployments} deployments)")
    return 0
