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

from .harness import EvalSpec, execute
from .problems import BENCHMARKS, MBPP_PLUS_KNOWN_BROKEN, SLOW_TASK_TIMEOUT_FACTOR, load_benchmark
from .sandbox import Limits, detect_isolation


def run(names: list[str], workers: int, timeout: float, slow_above: float) -> tuple[list[dict], list[dict]]:
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
            # Samples that needed more than `slow_above` seconds: the candidates for
            # SLOW_TASK_TIMEOUT_FACTOR (they time out once the machine is busy).
            slow += sorted((r for r in per if r["duration_s"] > slow_above), key=lambda r: -r["duration_s"])
            print(f"{name}: {res['n_passed_samples']}/{len(problems)} in {wall:.1f}s", flush=True)
    return rows, slow


def markdown(rows: list[dict], slow: list[dict], workers: int, timeout: float, slow_above: float) -> str:
    lines = [f"Canonical solutions, sandbox `{rows[0]['sandbox'] if rows else '?'}`, {workers} workers, "
             f"--timeout {timeout:g}, on {os.cpu_count()} CPUs ({platform.machine()}), "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}:", "",
             "| benchmark | problems | passed | not passed | wall time |", "| --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        why = ", ".join(f"{t} ({MBPP_PLUS_KNOWN_BROKEN.get(t, 'see docs')})" for t in r["not_passed"]) or "-"
        lines.append(f"| {r['benchmark']} | {r['problems']} | {r['passed']} | {why} | {r['wall_s']} s |")
    if slow:
        lines += ["", f"References that needed more than {slow_above:g} s (MBPP+ runs the reference and the "
                  "solution in each sample):", "",
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
    ap.add_argument("--slow-above", type=float, help="list references slower than this many seconds "
                    "(default: a third of --timeout)")
    args = ap.parse_args(argv)
    slow_above = args.slow_above if args.slow_above is not None else args.timeout / 3
    names = args.benchmarks or list(BENCHMARKS)
    rows, slow = run(names, args.workers, args.timeout, slow_above)
    print()
    print(markdown(rows, slow, args.workers, args.timeout, slow_above))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
