"""Execute samples against a benchmark in the sandbox; resumable; writes the result files.

OUTDIR/per_problem.jsonl: one line per executed sample (task_id, sample, passed, status,
reason, duration_s), appended and flushed as each finishes, so an interrupted run loses
at most the samples in flight; re-running skips every (task_id, sample) already there.
OUTDIR/results.json: the summary, rewritten atomically at the end.
"""
from __future__ import annotations

import json
import queue
import threading
from collections import defaultdict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..fsutil import atomic_write_text
from .passk import mean_pass_at_k, report_ks
from .problems import Problem
from .sandbox import ExecResult, Limits, Sandbox, describe

PER_PROBLEM = "per_problem.jsonl"
RESULTS = "results.json"
SAMPLES = "samples.jsonl"


def read_jsonl(path: Path, *, what: str) -> list[dict]:
    """Records of a JSONL file; a torn last line (crash mid-write) is dropped, others are errors."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                continue  # an interrupted append: the sample is simply run again
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({exc.msg}); fix or delete the {what}") from exc
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: each line must be a JSON object")
        records.append(rec)
    return records


def group_samples(records: list[dict], problems: list[Problem], source: str) -> dict[str, list[dict]]:
    """Samples per task_id, in file order; unknown task ids and unusable records are errors."""
    known = {p.task_id for p in problems}
    grouped: dict[str, list[dict]] = defaultdict(list)
    unknown = []
    for i, rec in enumerate(records):
        tid = rec.get("task_id")
        if not isinstance(tid, str):
            raise ValueError(f"{source}: record {i + 1} has no string 'task_id'")
        if rec.get("completion") is None and rec.get("solution") is None:
            raise ValueError(f"{source}: record {i + 1} ({tid}) has neither 'completion' nor 'solution'")
        if tid not in known:
            unknown.append(tid)
            continue
        grouped[tid].append(rec)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} task ids are not in this benchmark "
                         f"(first: {unknown[0]!r}); wrong BENCH?")
    return grouped


def sample_sha(sample: dict) -> str:
    """Identifies a sample's code, so a resumed run never mixes results of different samples."""
    import hashlib

    code = json.dumps([sample.get("completion"), sample.get("solution")])
    return hashlib.sha256(code.encode("utf-8")).hexdigest()[:16]


@dataclass
class EvalSpec:
    benchmark: str
    tier: str
    limits: Limits
    workers: int = 2
    decoder: dict | None = None
    model: str | None = None


def _prepare_out(outdir: Path, spec: EvalSpec) -> list[dict]:
    outdir.mkdir(parents=True, exist_ok=True)
    done = read_jsonl(outdir / PER_PROBLEM, what="per-problem file")
    old = outdir / RESULTS
    if old.exists() and done:
        prev = json.loads(old.read_text(encoding="utf-8"))
        if prev.get("benchmark") not in (None, spec.benchmark):
            raise ValueError(f"{outdir} holds results of {prev.get('benchmark')!r}, not {spec.benchmark!r}; "
                             "use another --out")
    # Rewrite without a torn last line, so the appends below start on a clean line.
    atomic_write_text(outdir / PER_PROBLEM, "".join(json.dumps(r) + "\n" for r in done))
    return done


def execute(problems: list[Problem], samples: dict[str, list[dict]], outdir: Path, spec: EvalSpec,
            on_progress: Callable[[int, int, ExecResult | None], None] | None = None) -> dict:
    """Run every (task, sample) not yet in per_problem.jsonl; return the results summary."""
    done = _prepare_out(outdir, spec)
    seen = {(r["task_id"], int(r.get("sample", 0))): r.get("sha") for r in done}
    todo = []
    for p in problems:
        for i, s in enumerate(samples.get(p.task_id, [])):
            key = (p.task_id, i)
            if key not in seen:
                todo.append((p, i, s))
            elif seen[key] not in (None, sample_sha(s)):
                raise ValueError(f"{outdir / PER_PROBLEM} was made from different samples ({p.task_id} #{i} "
                                 "differs); use another --out, or delete that directory to start over")
    total = sum(len(samples.get(p.task_id, [])) for p in problems)
    if on_progress:
        on_progress(total - len(todo), total, None)
    lock = threading.Lock()
    slots: queue.Queue[Sandbox] = queue.Queue()
    sandboxes = [Sandbox(spec.tier, spec.limits, slot=i) for i in range(max(1, spec.workers))]
    for sb in sandboxes:
        slots.put(sb)
    counter = [total - len(todo)]

    def run_one(problem: Problem, index: int, sample: dict) -> None:
        sb = slots.get()
        try:
            result = sb.run(problem.job(sample), timeout_factor=problem.extra.get("timeout_factor", 1))
        finally:
            slots.put(sb)
        rec = {"task_id": problem.task_id, "sample": index, "passed": result.passed,
               "status": result.status, "reason": result.reason, "duration_s": result.duration_s,
               "sha": sample_sha(sample)}
        with lock:
            with open(outdir / PER_PROBLEM, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
            counter[0] += 1
            if on_progress:
                on_progress(counter[0], total, result)

    try:
        with ThreadPoolExecutor(max_workers=max(1, spec.workers)) as pool:
            futures = [pool.submit(run_one, *t) for t in todo]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except KeyboardInterrupt:
                for fut in futures:  # finish only what is running; the rest resumes later
                    fut.cancel()
                raise
            for fut in futures:
                if fut.done() and fut.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise fut.exception()  # e.g. SandboxUnavailable: stop, keep what is done
    finally:
        for sb in sandboxes:
            sb.close()
    return summarize(problems, samples, outdir, spec)


def summarize(problems: list[Problem], samples: dict[str, list[dict]], outdir: Path, spec: EvalSpec) -> dict:
    """results.json from per_problem.jsonl (only problems that have samples count; `complete` says
    whether every problem asked for, all of the benchmark or the --limit subset, has them)."""
    records = read_jsonl(outdir / PER_PROBLEM, what="per-problem file")
    by_task: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in records:
        by_task[r["task_id"]][int(r.get("sample", 0))] = r
    counts, statuses = [], defaultdict(int)
    for p in problems:
        n_expected = len(samples.get(p.task_id, []))
        got = by_task.get(p.task_id, {})
        if n_expected == 0 or len(got) < n_expected:
            continue
        runs = [got[i] for i in range(n_expected)]
        counts.append((n_expected, sum(1 for r in runs if r["passed"])))
        for r in runs:
            statuses[r["status"]] += 1
    n_samples = min((n for n, _ in counts), default=0)
    summary: dict[str, Any] = {"benchmark": spec.benchmark, "n_problems": len(counts), "n_samples": n_samples,
                               "n_problems_total": len(problems), "complete": len(counts) == len(problems)}
    for k in report_ks(n_samples):
        summary[f"pass@{k}"] = round(mean_pass_at_k(counts, k), 6)
    passes = sum(int(x.get("passes", 0)) for xs in samples.values() for x in xs)
    if passes:  # made by `eval --model`: how many tokens each forward pass committed, on average
        summary["tokens_per_pass"] = round(sum(int(x.get("committed", 0)) for xs in samples.values() for x in xs)
                                           / passes, 4)
    summary.update({
        "n_passed_samples": sum(c for _, c in counts), "statuses": dict(sorted(statuses.items())),
        "decoder": spec.decoder or {}, "model": spec.model, "execution": describe(spec.tier, spec.limits),
    })
    atomic_write_text(outdir / RESULTS, json.dumps(summary, indent=2) + "\n")
    return summary
