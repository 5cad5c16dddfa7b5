"""The `diffcoder` command line: one parser, one subcommand module per subsystem.

Each module listed in COMMAND_MODULES exposes `register(subparsers)`; it adds its
subcommands and sets `func` (called with the parsed args, returns an exit code).
Heavy imports stay inside those functions so `diffcoder --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .hub import PullError

COMMAND_MODULES = [
    "diffcoder.engine.cli",  # generate, chat
    "diffcoder.serve.cli",  # serve
    "diffcoder.convert.cli",  # convert gguf
    "diffcoder.train.cli",  # tokenizer train, data build/sft, train, plot
    "diffcoder.eval.cli",  # eval
    "diffcoder.hub",  # pull
]


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
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (PullError, ValueError, FileNotFoundError) as exc:  # the user's input: one line, exit 2
        print(f"diffcoder {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
