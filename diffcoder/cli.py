"""The `diffcoder` command line: one parser, one subcommand module per subsystem.

Each module listed in COMMAND_MODULES exposes `register(subparsers)`; it adds its
subcommands and sets `func` (called with the parsed args, returns an exit code).
Heavy imports stay inside those functions so `diffcoder --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .pull import PullError

COMMAND_MODULES = [
    "diffcoder.run_cli",  # generate, chat
    "diffcoder.bench.cli",  # bench decode
    "diffcoder.serve.cli",  # serve
    "diffcoder.convert.cli",  # convert gguf
    "diffcoder.train.cli",  # tokenizer train, data build/sft, train, plot
    "diffcoder.eval.cli",  # eval
    "diffcoder.pull",  # pull
]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffcoder",
        description="Block-diffusion code language models: generate, chat, serve, train, evaluate.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "pass_through", False):
        args.extra = extra  # a pass-through command (bench decode) hands these to its own parser
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, PullError, ValueError, FileNotFoundError) as exc:
        print(f"diffcoder {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Import ourselves by name so `UserError` raised by subcommand modules (which import
    # diffcoder.cli) is the same class as the one main() catches under `python -m`.
    from diffcoder.cli import main as _main

    sys.exit(_main())
