"""`diffcoder eval BENCH ...`: generate (or take) samples, execute them sandboxed, report pass@k."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .problems import BENCHMARKS

EVAL_GEN_LENGTH = 512  # HumanEval/MBPP solutions need more room than `generate`'s default


def register(sub: argparse._SubParsersAction) -> None:
    from ..engine.cli import add_decoder_flags, add_model_flags, add_runner_flag

    p = sub.add_parser(
        "eval", help="evaluate a model (or samples) on HumanEval, MBPP, MBPP+ or HumanEval-Infilling",
        description="Generate samples with --model (default: the model shipped with diffcoder), or take "
        "them from --samples, run each one in a sandbox (no network, read-only filesystem, resource limits) and report pass@k. "
        "Resumable: re-running with the same --out (and decoder settings) skips what is done.")
    p.add_argument("benchmark", metavar="BENCH", choices=BENCHMARKS, help="one of: " + ", ".join(BENCHMARKS))
    add_model_flags(p)
    p.add_argument("--samples", metavar="FILE", help="a JSONL of {task_id, completion} (human-eval) or "
                   "{task_id, solution} (EvalPlus) to execute instead of generating; 'canonical' uses the "
                   "reference solutions, 'empty' empty completions")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="output directory (samples.jsonl, "
                   "generation.json, per_problem.jsonl, results.json)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per problem with --model (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--prompt-style", choices=["auto", "base", "instruct"], default="auto",
                   help="base: complete the code prompt; instruct: chat template and code-block "
                   "extraction; auto: instruct when the tokenizer has a chat template")
    add_decoder_flags(p)
    add_runner_flag(p)
    p.add_argument("--limit", type=int, help="only the first N problems (quick checks)")
    x = p.add_argument_group("execution")
    x.add_argument("--workers", type=int, default=2, help="programs run in parallel (default 2)")
    x.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program (default 10; "
                   "the few slow MBPP+ references get a multiple, see docs/eval.md)")
    x.add_argument("--memory-mb", type=int, default=4096, help="address-space limit per program (default 4096)")
    x.add_argument("--max-procs", type=int, default=32, help="processes per program (default 32)")
    x.add_argument("--sandbox", choices=["auto", "bwrap", "unshare"], default="auto",
                   help="isolation: bubblewrap, else namespaces via unshare + seccomp (default auto)")
    x.add_argument("--unsafe-no-sandbox", action="store_true", help="run model-written code WITHOUT "
                   "isolation (rlimits only) when no sandbox works; never on a machine you care about")
    p.add_argument("--stop-after-code", action="store_true", help="instruct prompts: stop each answer once its "
                   "first code block is closed (the rest is explanation, never scored; saves passes)")
    p.add_argument("--no-execute", action="store_true", help="with --model: only write OUTDIR/samples.jsonl "
                   "(e.g. on a GPU box without a sandbox); execute later with --samples OUTDIR/samples.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=cmd_eval)


def _check_args(args: argparse.Namespace) -> None:
    if args.model and args.samples:
        raise ValueError("give --model DIR (generate samples; default: the shipped model) or --samples FILE "
                         "(execute them), not both")
    for name in ("n_samples", "batch_size", "workers", "memory_mb", "max_procs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.timeout <= 0:
        raise ValueError("--timeout must be positive")
    if args.no_execute and args.samples:
        raise ValueError("--no-execute only makes sense when generating samples (it skips running them); "
                         "drop --samples")
    if args.samples and args.samples not in ("canonical", "empty") and not Path(args.samples).is_file():
        raise ValueError(f"--samples {args.samples}: no such file (or use 'canonical' / 'empty')")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..fsutil import atomic_write_text
    from .problems import load_benchmark
    from .harness import SAMPLES, EvalSpec, group_samples, read_jsonl
    from .sandbox import Limits, SandboxUnavailable, detect_isolation

    _check_args(args)
    problems = load_benchmark(args.benchmark, args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.no_execute:
        _, decoder = _generate(args, problems, out / SAMPLES)
        print(f"samples: {out / SAMPLES}  (execute with: diffcoder eval {args.benchmark} --samples "
              f"{out / SAMPLES} --out {out})")
        return 0
    try:  # before generating: no point decoding for an hour and then refusing to execute
        tier = detect_isolation(args.sandbox, allow_unsafe=args.unsafe_no_sandbox)
    except SandboxUnavailable as exc:
        raise ValueError(str(exc)) from None
    if tier == "none":
        print("WARNING: running model-written code WITHOUT a sandbox (--unsafe-no-sandbox)", file=sys.stderr)
    decoder, model_name = None, None
    if not args.samples:
        samples, decoder = _generate(args, problems, out / SAMPLES)
        model_name = _model_of(args)
    elif args.samples in ("canonical", "empty"):
        records = [p.canonical_sample() if args.samples == "canonical" else {"task_id": p.task_id, "completion": ""}
                   for p in problems]
        text = "".join(json.dumps(r) + "\n" for r in records)
        if (out / SAMPLES).exists() and (out / SAMPLES).read_text(encoding="utf-8") != text:
            raise ValueError(f"{out / SAMPLES} holds other samples (a model's?); use another --out")
        atomic_write_text(out / SAMPLES, text)
        samples = group_samples(records, problems, args.samples)
        model_name = f"<{args.samples} samples>"
    else:
        records = read_jsonl(Path(args.samples), what="samples file")
        if not records:
            raise ValueError(f"--samples {args.samples}: the file has no samples")
        samples = group_samples(records, _covering(problems, records, args), args.samples)
        model_name = f"samples: {args.samples}"
    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb, max_procs=args.max_procs)
    spec = EvalSpec(args.benchmark, tier, limits, workers=args.workers, decoder=decoder, model=model_name)
    try:
        results = _run_with_progress(problems, samples, out, spec, show=not args.no_progress)
    except SandboxUnavailable as exc:
        raise ValueError(f"{exc} (results so far are kept in {out}; re-run to resume)") from None
    _print_summary(results, out)
    return 0


def _covering(problems: list, records: list[dict], args: argparse.Namespace) -> list:
    # With --limit, samples of later problems are simply not run (rather than an error).
    if args.limit:
        from .problems import load_benchmark

        wanted = {p.task_id for p in problems}
        full = load_benchmark(args.benchmark)
        known = {p.task_id for p in full}
        records[:] = [r for r in records if r.get("task_id") not in known or r.get("task_id") in wanted]
    return problems


def _generate(args: argparse.Namespace, problems: list, path: Path) -> tuple[dict, dict]:
    from ..engine.decoding import DecodeArgs, validate_args
    from ..engine.cli import decoder_kwargs, load_model
    from .generation import GenSpec, check_settings, generate_samples

    model = load_model(args)
    saved = getattr(model, "generation_defaults", {}) or {}
    if args.gen_length is None and "gen_length" not in saved:
        args.gen_length = EVAL_GEN_LENGTH
    kw = decoder_kwargs(args, model)
    spec = GenSpec(steps=kw["steps"], gen_length=kw["gen_length"], block_length=kw["block_length"],
                   threshold=kw["threshold"], temperature=kw["temperature"], remasking=kw["remasking"],
                   shift=bool(kw["shift"]), batch_size=args.batch_size, n_samples=args.n_samples,
                   seed=kw["seed"] or 0, prompt_style=args.prompt_style,
                   max_active_blocks=kw["max_active_blocks"], block_add_threshold=kw["block_add_threshold"],
                   speculative=bool(kw["speculative"]),
                   runner=args.runner, stop_after_code=args.stop_after_code)
    if args.n_samples > 1 and spec.temperature == 0 and spec.remasking != "random":
        print("note: --n-samples > 1 with temperature 0 gives identical samples; pass --temperature",
              file=sys.stderr)
    decoder = {**spec.decoder_kwargs(), "seed": spec.seed, "batch_size": spec.batch_size,
               "prompt_style": spec.prompt_style, "n_samples": spec.n_samples,
               **({"stop_after_code": True} if spec.stop_after_code else {}),
               "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
               **weights_record(model)}
    # Refuse bad decoder flags before generation.json records them (a stand-in prompt: the real
    # ones are checked per batch), so a refused run leaves nothing that blocks the next one.
    flags = {k: v for k, v in spec.decoder_kwargs().items() if k != "runner"}
    validate_args(DecodeArgs(**flags, mask_id=getattr(model, "mask_id", None)), [[0]])
    check_settings(path.parent, path, {"model": _model_of(args), **decoder})
    with _progress(not args.no_progress, "generating") as update:
        samples = generate_samples(model, problems, path, spec, on_progress=update)
    return samples, decoder


def weights_record(model: Any) -> dict[str, str]:
    """Which weights made the samples: a model name can be pulled again with other weights (a new
    release), and resuming must not mix samples of two."""
    from ..checkpoint import weights_sha256

    from .generation import WEIGHTS_KEY

    return {WEIGHTS_KEY: weights_sha256(model.source)} if model.source is not None else {}


def _model_of(args: argparse.Namespace) -> str:
    from ..defaults import default_model_dir

    return str(args.model or default_model_dir())


class _progress:
    """A rich progress bar (or nothing) fed with (done, total)."""

    def __init__(self, show: bool, label: str) -> None:
        self.show, self.label = show, label

    def __enter__(self):
        if not self.show:
            return lambda done, total, *_: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[note]}"), transient=False)
        self.bar.__enter__()
        self.task = self.bar.add_task(self.label, total=None, note="")

        def update(done: int, total: int, result: Any = None) -> None:
            note = f"last: {result.status}" if result is not None else ""
            self.bar.update(self.task, completed=done, total=total, note=note)
        return update

    def __exit__(self, *exc: Any) -> None:
        if self.show:
            self.bar.__exit__(*exc)


def _run_with_progress(problems: list, samples: dict, out: Path, spec: Any, show: bool) -> dict:
    from .harness import execute

    with _progress(show, "executing") as update:
        return execute(problems, samples, out, spec, on_progress=update)


def _print_summary(results: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['benchmark']}  ({results['execution']['sandbox']} sandbox)")
    table.add_column("problems", justify="right")
    table.add_column("samples/problem", justify="right")
    for key in [k for k in results if k.startswith("pass@")]:
        table.add_column(key, justify="right")
    table.add_column("statuses")
    table.add_row(str(results["n_problems"]), str(results["n_samples"]),
                  *[f"{100 * results[k]:.2f}%" for k in results if k.startswith("pass@")],
                  ", ".join(f"{k} {v}" for k, v in results["statuses"].items()))
    console = Console()
    console.print(table)
    if not results["complete"]:
        console.print(f"[bold red]PARTIAL: {results['n_problems']} of {results['n_problems_total']} problems "
                      "have samples; pass@k is over those only, not the benchmark[/]")
    console.print(f"results: {out / 'results.json'}   per problem: {out / 'per_problem.jsonl'}")
