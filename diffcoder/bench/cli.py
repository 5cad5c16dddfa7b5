"""`diffcoder bench decode ...`: the decode benchmark (same flags as benchmarks/decode.py)."""
from __future__ import annotations

import argparse


def _decode(args: argparse.Namespace) -> int:
    from .decode import main

    main(args.extra)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: decode speed against the release's approach",
                       description="Benchmarks shipped with diffcoder.")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    d = bench.add_parser("decode", add_help=False, help="our engine vs the release-approach baseline, same "
                         "weights and prompts; last line JSON (flags: diffcoder bench decode --help)")
    d.set_defaults(func=_decode, pass_through=True)
