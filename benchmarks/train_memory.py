"""Memory of a training process over a run: `diffcoder train` with the heap trimmed after every
step (the default), every 10 steps and never (`--trim-heap-every 1 / 10 / 0`), one after the other.

Each arm is a separate `diffcoder train` process; its resident memory (VmRSS), minor page faults
and system CPU time are read from /proc every half second. Prints one JSON line per arm (RSS
between steps: after the first, the most, before the last; the peak inside a step; median step
time; page faults and kernel time per step), then the same as a markdown table. Linux only.

    .venv/bin/python benchmarks/train_memory.py --data SFT_DIR [--steps 20] \
        [-- extra train flags, default: the diffcoder-0.5b stage-1 settings]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import hardware_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FLAGS = ["--config", str(ROOT / "runs/diffcoder_05b/sft.toml"), "--init", "qwen2.5-coder-0.5b-instruct",
                 "--seed", "0"]
# The heap trimmed after every step (the default), every 10 steps, never.
ARMS = {"every-step": ["--trim-heap-every", "1"], "every-10": ["--trim-heap-every", "10"],
        "never": ["--trim-heap-every", "0"]}
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> tuple[int, int, float] | None:
    """(RSS bytes, minor faults, system CPU seconds) of a live process."""
    try:
        statm = Path(f"/proc/{pid}/statm").read_text().split()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # fields after the command name: state is index 0, minflt 7, stime 12 (proc(5) numbers 10 and 15)
    return int(statm[1]) * PAGE, int(stat[7]), int(stat[12]) / TICK


def run_arm(name: str, flags: list[str], data: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "diffcoder", "train", "--data", data, "--out", str(out), "--steps", str(steps),
           "--save-every", "0", "--quiet", *flags]
    log = out.with_name(out.name + ".stderr")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        metrics, after, peak = out / "metrics.jsonl", {}, 0
        while proc.poll() is None:
            got = sample(proc.pid)
            if got is not None:
                peak = max(peak, got[0])
                done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
                # The first sample after step `done` was logged: between two steps (the trainer
                # trims before it logs), before the next step has allocated much.
                after.setdefault(done, got)
            time.sleep(0.5)
    recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    killed = proc.returncode == -signal.SIGKILL  # the kernel's OOM killer, when memory ran out
    if proc.returncode and not (killed and len(recs) > 2):
        sys.exit(f"arm {name}: `{' '.join(cmd)}` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    last = len(recs) if killed else steps - 1  # the last step's sample is the final save's
    between = [after[s] for s in range(1, last + 1) if s in after]
    first, end = between[0], between[-1]
    return {"arm": name, "steps": steps, "killed_after_step": len(recs) if killed else None,
            "peak_rss_gb": peak / 1e9,
            "rss_after_step_1_gb": first[0] / 1e9, "max_rss_between_steps_gb": max(b[0] for b in between) / 1e9,
            "rss_before_last_step_gb": end[0] / 1e9,
            "median_step_s": statistics.median(r["step_time_s"] for r in recs[1:]),
            "minor_faults_per_step": (end[1] - first[1]) / max(1, len(between) - 1),
            "system_cpu_s_per_step": (end[2] - first[2]) / max(1, len(between) - 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="training data directory (`diffcoder data sft` output)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per arm")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("flags", nargs="*", help="train flags after `--` (default: %(default)s)", default=DEFAULT_FLAGS)
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be >= 3: RSS is read between steps, and the first and last are special")
    if not Path("/proc/self/statm").exists():
        sys.exit("train_memory.py reads /proc: Linux only")
    print(json.dumps({"hardware": hardware_name(torch.device("cpu")), "train_flags": args.flags}), flush=True)
    rows = {}
    for name in args.arms:
        with tempfile.TemporaryDirectory() as tmp:
            rows[name] = run_arm(name, ARMS[name] + args.flags, args.data, args.steps, Path(tmp) / "run")
        print(json.dumps(rows[name]), flush=True)
    print_table(rows)


def print_table(rows: dict[str, dict]) -> None:
    print("| arm | steps | RSS after step 1 (GB) | most RSS between steps (GB) | RSS before the last step (GB) | "
          "peak RSS (GB) | median step (s) | minor faults / step | kernel CPU s / step |")
    print("|" + "---|" * 9)
    for r in rows.values():
        steps = f"{r['killed_after_step']} of {r['steps']} (killed)" if r["killed_after_step"] else r["steps"]
        print(f"| {r['arm']} | {steps} | {r['rss_after_step_1_gb']:.2f} | {r['max_rss_between_steps_gb']:.2f} | "
              f"{r['rss_before_last_step_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['median_step_s']:.1f} | "
              f"{r['minor_faults_per_step']:,.0f} | {r['system_cpu_s_per_step']:.2f} |")

if __name__ == "__main__":
    main()
