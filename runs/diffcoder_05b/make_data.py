"""Self-distilled SFT data for diffcoder-0.5b: the AR base writes instructions and answers.

    python runs/diffcoder_05b/make_data.py --base BASE_DIR --out DATA_DIR [--stubs N --self-instruct N]
                                           [--fim N] [--seed S --exclude OLD/prompts.jsonl.gz ...]

--fim N adds N fill-in-the-middle samples cut from standard-library functions (real code, not the
base's: sft_synth.fim_samples), so that the model learns infilling in its own FIM format too; none
from a function that an --exclude'd set's FIM samples were cut from.

More data later: a new --seed and --exclude with the earlier sets' prompts make instructions none
of them holds.

Resumable: rerun the same command to continue. See diffcoder/train/distill.py for the method.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

import diffcoder
from diffcoder.fsutil import atomic_write_text
from diffcoder.train import distill, sft_synth
from diffcoder.train.sft_data import fim_document


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "tkinter", "ensurepip")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def read_prompts(path: Path) -> list[dict]:
    """An earlier data set's prompts.jsonl, gzipped (as committed) or not."""
    if not path.is_file():
        raise SystemExit(f"--exclude {path}: no such file (give a data set's prompts.jsonl or prompts.jsonl.gz)")
    return distill.read_jsonl(path)


def earlier_fim_functions(prompt_files: list[Path]) -> frozenset[str]:
    """The functions (prefix + middle + suffix) that earlier sets cut FIM samples from: their
    train.jsonl[.gz] beside the prompts.jsonl[.gz] given to --exclude."""
    done: set[str] = set()
    for path in prompt_files:
        train = next((t for t in (path.with_name("train.jsonl.gz"), path.with_name("train.jsonl")) if t.exists()), None)
        if train is not None:
            done |= {fim_document(r["fim"]) for r in distill.read_jsonl(train) if "fim" in r}
    return frozenset(done)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the AR base checkpoint (or a pulled model name)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--stubs", type=int, default=1500, help="implement-this-function prompts from the stdlib")
    ap.add_argument("--self-instruct", type=int, default=800, help="prompts written by the model itself")
    ap.add_argument("--fim", type=int, default=0, help="fill-in-the-middle samples from stdlib functions")
    ap.add_argument("--gen-length", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ngram", type=int, default=10, help="contamination check: shared word n-gram length")
    ap.add_argument("--exclude", nargs="*", type=Path, default=[],
                    help="prompts.jsonl[.gz] of earlier data sets: make none of their instructions again")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = diffcoder.load(args.base, dtype="bfloat16")
    t0 = time.time()
    prompts_path = args.out / "prompts.jsonl"

    def progress(what: str):
        return lambda done, total: print(f"{what}: {done}/{total}  {time.time() - t0:.0f}s", flush=True)

    if not prompts_path.exists():
        old = frozenset(r["prompt"] for path in args.exclude for r in read_prompts(path))
        stubs = distill.stub_prompts(stdlib_files(), args.stubs, args.seed, exclude=old)
        partial = args.out / "self-instruct.partial.jsonl"  # resumes an interrupted run (distill.py)
        mine = distill.self_instruct_prompts(model, args.self_instruct, args.seed, args.batch_size,
                                             on_progress=progress("self-instruct prompts"), exclude=old,
                                             progress_file=partial)
        both = [("stub", p) for p in stubs] + [("self-instruct", p) for p in mine]
        random.Random(args.seed).shuffle(both)
        distill.write_prompts(prompts_path, both)
        partial.unlink(missing_ok=True)
    prompts = distill.read_jsonl(prompts_path)
    kept = distill.answer_prompts(model, prompts, args.out / "chats.jsonl", args.gen_length, args.batch_size,
                                  args.seed, on_progress=progress("answers"))
    print(f"{kept} chats from {len(prompts)} prompts in {time.time() - t0:.0f}s")
    fim_path = args.out / "fim.jsonl"
    if args.fim and not fim_path.exists():
        fim = sft_synth.fim_samples(stdlib_files(), args.fim, args.seed, exclude=earlier_fim_functions(args.exclude))
        atomic_write_text(fim_path, "".join(json.dumps({"id": f"fim-{i}", **x}, ensure_ascii=False) + "\n"
                                            for i, x in enumerate(fim)))
    report = decontaminate(args.out / "chats.jsonl", fim_path, args.out / "train.jsonl", args.ngram)
    print(json.dumps(report["summary"]))
    return 0


def decontaminate(chats_path: Path, fim_path: Path, dst: Path, n: int) -> dict:
    """Drop every chat or FIM sample sharing a word n-gram with HumanEval or MBPP; write the rest
    (chats first) and a report."""
    from diffcoder.train.contamination import BENCHMARKS, benchmark_ngrams, overlaps

    index = benchmark_ngrams(n)
    flagged: dict[str, list[str]] = {}
    summary: dict = {"ngram_words": n, "benchmarks": list(BENCHMARKS)}
    clean = []
    for kind, rows in (("chats", distill.read_jsonl(chats_path)), ("fim", distill.read_jsonl(fim_path))):
        kept = 0
        for r in rows:
            sample = {"fim": r["fim"]} if kind == "fim" else {"messages": r["messages"]}
            text = fim_document(r["fim"]) if kind == "fim" else "\n".join(m["content"] for m in r["messages"])
            hits = overlaps(text, index, n)
            if hits:
                flagged[str(r["id"])] = hits
            else:
                clean.append(sample)
                kept += 1
        if kind == "chats":
            summary.update(chats=len(rows), dropped=len(rows) - kept, kept=kept)
        elif rows:
            summary["fim"] = {"samples": len(rows), "dropped": len(rows) - kept, "kept": kept}
    atomic_write_text(dst, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in clean))
    report = {"summary": summary, "dropped": flagged}
    atomic_write_text(dst.with_name("contamination.json"), json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main())
