"""Exact-match code tasks cut from held-out source files: next-line completion, single-line and
multi-line infilling.

The files are the validation split of a `diffcoder data build` directory (files.jsonl), which no
training stage reads. Tasks are drawn by a seeded RNG, so the same data directory and seed give
the same tasks on any machine. Scoring is exact match after normalising whitespace at line ends
(and, for completion, only the first generated line counts).

Every prompt ends with the target line's indentation: a prompt that ended at the bare newline
would end on a token BPE almost never produces there ("\n" followed by "    " is one token
"\n    " in running text), and small models then continue with more newlines. Scores are exact
match and edit similarity (difflib's ratio, as CodeXGLUE / CrossCodeEval report next to EM),
which still separates models that rarely get a line exactly right.

Each model is decoded the way it was trained: a block-diffusion model with the block decoder
(no shift), an AR model with `block_length=1, shift=True` (plain greedy next-token decoding).
Infilling uses the tokenizer's FIM tokens for both (suffix-prefix-middle order).
"""
from __future__ import annotations

import difflib
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KINDS = ("next_line", "infill_line", "infill_multi")
# Characters of context on each side: with a ~3.6 chars/token code BPE this keeps a prompt near
# 330 tokens, inside the 512-token training windows together with the generated tokens.
PREFIX_CHARS, SUFFIX_CHARS = 900, 300
GEN_TOKENS = {"next_line": 32, "infill_line": 32, "infill_multi": 64}


@dataclass(frozen=True)
class Task:
    kind: str
    source: str  # file path, for the record
    prefix: str
    suffix: str  # "" for next_line
    target: str


def _meaningful(line: str) -> bool:
    s = line.strip()
    return len(s) >= 6 and not s.startswith("#") and s not in ('"""', "'''")


def heldout_files(datadir: str | Path) -> list[Path]:
    """Validation-split .py files of a data directory, in listing order."""
    listing = Path(datadir) / "files.jsonl"
    if not listing.exists():
        raise FileNotFoundError(f"{datadir}: no files.jsonl (expected a `diffcoder data build` directory)")
    rows = [json.loads(line) for line in listing.read_text().splitlines() if line.strip()]
    files = [Path(r["path"]) for r in rows if r["split"] == "validation" and r["path"].endswith(".py")]
    if not files:
        raise ValueError(f"{datadir}: no held-out .py files (rebuild with --val-fraction > 0)")
    return files


def make_tasks(datadir: str | Path, n_per_kind: int = 200, seed: int = 0) -> list[Task]:
    """n_per_kind tasks of each kind, spread over the held-out files."""
    rng = random.Random(seed)
    candidates: dict[str, list[Task]] = {k: [] for k in KINDS}
    for path in heldout_files(datadir):
        try:
            lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
        except (OSError, UnicodeDecodeError):
            continue
        for i in range(5, len(lines) - 3):
            if not _meaningful(lines[i]):
                continue
            indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
            before = "\n".join(lines[:i]) + "\n"
            prefix = before[-PREFIX_CHARS:]
            prefix = (prefix[prefix.find("\n") + 1:] if len(before) > PREFIX_CHARS else prefix) + indent
            line = lines[i][len(indent):]
            candidates["next_line"].append(Task("next_line", str(path), prefix, "", line))
            after = "\n" + "\n".join(lines[i + 1:])
            candidates["infill_line"].append(Task("infill_line", str(path), prefix, after[:SUFFIX_CHARS], line))
            span = rng.randint(2, 4)
            block = lines[i:i + span]
            if len(block) == span and all(b.strip() for b in block):
                rest = "\n" + "\n".join(lines[i + span:])
                candidates["infill_multi"].append(
                    Task("infill_multi", str(path), prefix, rest[:SUFFIX_CHARS], "\n".join([line, *block[1:]])))
    tasks = []
    for kind in KINDS:
        pool = candidates[kind]
        if len(pool) < n_per_kind:
            raise ValueError(f"{datadir}: only {len(pool)} {kind} candidates in the held-out files, "
                             f"asked for {n_per_kind}")
        tasks += rng.sample(pool, n_per_kind)
    return tasks


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n")).strip()


def _answer(task: Task, output: str) -> str:
    """What is scored: completion's first line, infilling's whole middle."""
    return _normalise(output.split("\n", 1)[0] if task.kind == "next_line" else output)


def score(task: Task, output: str) -> bool:
    """Exact match (whitespace at line ends ignored)."""
    return _answer(task, output) == _normalise(task.target)


def edit_similarity(task: Task, output: str) -> float:
    """difflib's similarity ratio of the scored answer and the target, in [0, 1]."""
    return difflib.SequenceMatcher(None, _answer(task, output), _normalise(task.target), autojunk=False).ratio()


@dataclass
class DecodeStyle:
    """How a model is decoded: `ar` (B=1, shift, greedy) or `block` (block diffusion; shift and remasking
    are the checkpoint's, from its generation_config.json)."""

    kind: str = "block"
    block_length: int = 4
    threshold: float | None = None
    max_active_blocks: int = 1  # > 1: multi-block pipelining (needs a threshold)
    block_add_threshold: float = 0.5

    def kwargs(self, gen_length: int) -> dict[str, Any]:
        if self.kind == "ar":
            return {"block_length": 1, "shift": True, "steps": gen_length, "gen_length": gen_length}
        if self.kind != "block":
            raise ValueError(f"decode style must be 'ar' or 'block', not {self.kind!r}")
        return {"block_length": self.block_length, "steps": gen_length, "gen_length": gen_length,
                "threshold": self.threshold, "max_active_blocks": self.max_active_blocks,
                "block_add_threshold": self.block_add_threshold}


def _prompt(tok: Any, task: Task) -> list[int]:
    if task.kind == "next_line":
        return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(task.prefix)
    return tok.fim_prompt(task.prefix, task.suffix)


def first_per_kind(tasks: list[Task], n: int) -> list[Task]:
    """The first n tasks of each kind (a fixed subset, e.g. for batch-1 timing)."""
    return [t for kind in KINDS for t in [x for x in tasks if x.kind == kind][:n]]


def run_tasks(model: Any, tasks: list[Task], style: DecodeStyle, batch_size: int = 16,
              keep_records: bool = True) -> dict[str, Any]:
    """Decode every task, score it; returns per-kind exact match with its standard error, tokens
    per forward pass (batch 1 only: a batch's passes serve several rows) and wall time, plus
    each task's output under "records" unless keep_records is False."""
    from diffcoder.engine.decoding import generate

    tok = model.tokenizer
    outputs: list[dict[str, Any]] = []
    for kind in KINDS:
        group = [t for t in tasks if t.kind == kind]
        kw = style.kwargs(GEN_TOKENS[kind])
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            t0 = time.perf_counter()
            res = generate(model, [_prompt(tok, t) for t in batch], eos_id=tok.eos_id, **kw)
            dt = time.perf_counter() - t0
            for task, ids in zip(batch, res.tokens):
                text = tok.decode([i for i in ids if i != tok.eos_id])
                outputs.append({"kind": kind, "ok": score(task, text), "es": edit_similarity(task, text),
                                "output": text, "target": task.target,
                                "tokens": len(ids), "nfe": res.nfe if len(batch) == 1 else None,
                                "seconds": dt / len(batch)})
    summary = summarise(outputs) | {"style": asdict(style), "batch_size": batch_size}
    return summary | {"records": outputs} if keep_records else summary


def summarise(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        rows = [o for o in outputs if o["kind"] == kind]
        if not rows:
            continue
        p = sum(o["ok"] for o in rows) / len(rows)
        es = [o["es"] for o in rows]
        es_sd = statistics.stdev(es) if len(es) > 1 else 0.0
        entry = {"n": len(rows), "exact_match": p, "stderr": math.sqrt(p * (1 - p) / len(rows)),
                 "edit_similarity": statistics.fmean(es), "edit_similarity_stderr": es_sd / math.sqrt(len(es)),
                 "seconds_per_token": sum(o["seconds"] for o in rows) / max(1, sum(o["tokens"] for o in rows))}
        if all(o["nfe"] is not None for o in rows):
            entry["tokens_per_pass"] = sum(o["tokens"] for o in rows) / max(1, sum(o["nfe"] for o in rows))
        out[kind] = entry
    return out
