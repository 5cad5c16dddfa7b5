"""Canonical-solution check of every benchmark, timed: the figures quoted in docs/eval.md.

    python -m diffcoder.eval.report                      # all benchmarks, full
    python -m diffcoder.eval.report humaneval mbpp --workers 2

For each benchmark it runs the reference solutions through the same sandboxed harness as
`diffcoder eval --samples canonical`, then prints a Markdown table (problems, passed, the
ids that did not pass, wall time) and the slowest MBPP+ references.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from .benchmarks import BENCHMARKS, MBPP_PLUS_KNOWN_BROKEN, SLOW_TASK_TIMEOUT_FACTOR, load_benchmark
from .harness import EvalSpec, execute
from .sandbox import Limits, detect_isolation


def run(names: list[str], workers: int, timeout: float) -> tuple[list[dict], list[dict]]:
    tier = detect_isolation("auto")
    rows, slow = [], []
    with tempfile.TemporaryDirectory(prefix="diffcoder-eval-report-") as tmp:
        for name in names:
            problems = load_benchmark(name)
            samples = {p.task_id: [p.canonical_sample()] for p in problems}
            out = Path(tmp) / name
            start = time.monotonic()
            res = execute(problems, samples, out, EvalSpec(name, tier, Limits(timeout_s=timeout), workers=workers))
            wall = time.monotonic() - start
            per = [json.loads(line) for line in (out / "per_problem.jsonl").read_text().splitlines()]
            failed = sorted(r["task_id"] for r in per if not r["passed"])
            rows.append({"benchmark": name, "problems": len(problems), "passed": res["n_passed_samples"],
                         "not_passed": failed, "wall_s": round(wall, 1), "sandbox": tier})
            if name == "mbpp-plus":
                slow = sorted(per, key=lambda r: -r["duration_s"])[:6]
            print(f"{name}: {res['n_passed_samples']}/{len(problems)} in {wall:.1f}s", flush=True)
    return rows, slow


def markdown(rows: list[dict], slow: list[dict], workers: int, timeout: float) -> str:
    lines = [f"Canonical solutions, sandbox `{rows[0]['sandbox'] if rows else '?'}`, {workers} workers, "
             f"--timeout {timeout:g}, on {os.cpu_count()} CPUs ({platform.machine()}), "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}:", "",
             "| benchmark | problems | passed | not passed | wall time |", "| --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        why = ", ".join(f"{t} ({MBPP_PLUS_KNOWN_BROKEN.get(t, 'see docs')})" for t in r["not_passed"]) or "-"
        lines.append(f"| {r['benchmark']} | {r['problems']} | {r['passed']} | {why} | {r['wall_s']} s |")
    if slow:
        lines += ["", "Slowest MBPP+ references (reference and solution both run per sample):", "",
                  "| task | seconds | timeout factor |", "| --- | ---: | ---: |"]
        for r in slow:
            factor = SLOW_TASK_TIMEOUT_FACTOR.get(r["task_id"], 1)
            lines.append(f"| {r['task_id']} | {r['duration_s']} | {factor} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchmarks", nargs="*", choices=[[], *BENCHMARKS], default=[],
                    help="benchmarks to check (default: all)")
    ap.add_argument("--workers", type=int, default=2, help="parallel programs (default 2)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10, as the CLI)")
    args = ap.parse_args(argv)
    names = args.benchmarks or list(BENCHMARKS)
    rows, slow = run(names, args.workers, args.timeout)
    print()
    print(markdown(rows, slow, args.workers, args.timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
