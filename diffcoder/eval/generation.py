"""The `--model` path: prompts -> block-diffusion decoder -> OUTDIR/samples.jsonl (resumable)."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .problems import Problem
from .prompts import base_prompt, base_sample, instruct_messages, instruct_sample

GENERATION = "generation.json"
WEIGHTS_KEY = "weights_sha256"  # the weights that made the samples (checkpoint.weights_sha256)


@dataclass
class GenSpec:
    """Decoder settings (the flags of `diffcoder generate`) plus batching and prompt style."""

    steps: int | None = None
    gen_length: int = 512
    block_length: int = 4
    threshold: float | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    shift: bool = False
    batch_size: int = 8
    n_samples: int = 1
    seed: int = 0
    prompt_style: str = "auto"
    max_active_blocks: int = 1
    block_add_threshold: float = 0.5
    speculative: bool = False  # exact: the tokens of one token per pass, in fewer passes
    runner: str = "auto"  # how each pass runs (diffcoder.engine.runners); recorded when not the default
    stop_after_code: bool = False  # instruct answers: stop a row once its first code block is closed

    def decoder_kwargs(self) -> dict[str, Any]:
        kw = {"steps": self.steps or self.gen_length, "gen_length": self.gen_length,
              "block_length": self.block_length, "threshold": self.threshold,
              "temperature": self.temperature, "remasking": self.remasking, "shift": self.shift}
        if self.max_active_blocks > 1:  # recorded in results.json only when pipelining is on
            kw.update(max_active_blocks=self.max_active_blocks, block_add_threshold=self.block_add_threshold)
        if self.speculative:  # recorded in results.json only when on
            kw["speculative"] = True
        if self.runner != "auto":  # exact modes decode the same tokens; bf16 kernels may round differently
            kw["runner"] = self.runner
        return kw


def check_settings(outdir: Path, samples: Path, settings: dict[str, Any]) -> None:
    """Record in OUTDIR/generation.json the settings that make `samples`, or refuse to add to
    samples made with other settings (n_samples may grow: it only says how many to make)."""
    from ..fsutil import atomic_write_text
    from .harness import read_jsonl

    path = outdir / GENERATION
    wanted = {k: v for k, v in json.loads(json.dumps(settings)).items() if k != "n_samples"}
    if not path.exists():
        if read_jsonl(samples, what="samples file"):
            raise ValueError(f"{samples} holds samples with no record of the settings that made them ({path}); "
                             "use a new --out")
        atomic_write_text(path, json.dumps(wanted, indent=2) + "\n")
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}); use a new --out") from exc
    if WEIGHTS_KEY not in stored:  # recorded before the weights' sha256 was: compared without it
        wanted.pop(WEIGHTS_KEY, None)
    diff = [k for k in sorted(set(wanted) | set(stored)) if wanted.get(k) != stored.get(k)]
    if diff:
        was = ", ".join(f"{k}={stored.get(k)!r}" for k in diff)
        now = ", ".join(f"{k}={wanted.get(k)!r}" for k in diff)
        raise ValueError(f"{samples} was generated with {was}, this run asks for {now}; resuming would mix "
                         "samples of different settings: use a new --out (or the recorded settings to resume)")


def resolve_style(style: str, tokenizer: Any) -> str:
    if style not in ("auto", "base", "instruct"):
        raise ValueError(f"--prompt-style must be auto, base or instruct, not {style!r}")
    if style == "auto":
        return "instruct" if tokenizer.has_chat_template else "base"
    if style == "instruct" and not tokenizer.has_chat_template:
        raise ValueError("--prompt-style instruct needs a tokenizer with a chat template; use --prompt-style base")
    return style


def prompt_ids(problem: Problem, style: str, tok: Any) -> list[int]:
    """The token ids `diffcoder eval` decodes for PROBLEM in STYLE (instruct: the chat template)."""
    if style == "instruct":
        return tok.apply_chat_template(instruct_messages(problem), add_generation_prompt=True)
    ids = tok.encode(base_prompt(problem))
    return ([tok.bos_id] if tok.bos_id is not None else []) + ids


def _to_sample(problem: Problem, style: str, text: str, stats: dict) -> dict:
    if problem.kind == "infill":
        # Single-line infilling scores one line, as InCoder's evaluation does: a model that goes on
        # past the line (an instruct model's FIM rarely stops at it) is cut at the first newline.
        completion = text.split("\n", 1)[0] + "\n" if problem.one_line and "\n" in text else text
        sample = {"task_id": problem.task_id, "completion": completion}
    else:
        sample = instruct_sample(problem, text) if style == "instruct" else base_sample(problem, text)
    return {**sample, "raw": text, **stats}  # the model's whole text beside what was extracted from it


_CLOSED_BLOCK = re.compile(r"```[^\n]*\n.*?```", re.DOTALL)


def _decode_batch(model: Any, batch: list[Problem], style: str, kwargs: dict, seed: int,
                  stop_after_code: bool = False) -> tuple[list[str], list[dict]]:
    """Texts for one batch, and per row the decoding's cost: forward passes it took part in and
    tokens committed (FIM problems through `diffcoder.infill_many`, others through `generate`).
    `stop_after_code`: a row stops once its text holds a closed code block (what is scored; the
    explanation an instruct model writes after it would only cost passes)."""
    import diffcoder
    from diffcoder.engine.decoding import BlockEvent, Decoding, StepEvent

    tok = model.tokenizer
    if batch[0].kind == "infill":  # a benchmark is all-infill or none
        pairs = [(p.prompt, p.suffix) for p in batch]
        return diffcoder.infill_many(model, pairs, seed=seed, **kwargs), [{} for _ in batch]
    prompts = [prompt_ids(p, style, tok) for p in batch]
    passes: list[set[int]] = [set() for _ in batch]  # the passes (by number) in which a row committed tokens
    committed = [0] * len(batch)
    final: list[list[int]] = [[] for _ in batch]
    dec = Decoding(model, prompts, eos_id=tok.eos_id, seed=seed, step_events=True, **kwargs)
    for event in dec:
        if isinstance(event, StepEvent):  # pipelined blocks commit in one pass: count the pass once
            passes[event.row].add(dec.nfe)
            committed[event.row] += len(event.positions)
        elif stop_after_code and isinstance(event, BlockEvent) and not event.finished:
            final[event.row].extend(event.tokens)
            if _CLOSED_BLOCK.search(tok.decode(final[event.row])):
                dec.cancel(event.row)
    stats = [{"passes": len(p), "committed": c} for p, c in zip(passes, committed)]
    return [tok.decode([t for t in ids if t != tok.eos_id]) for ids in dec.result.tokens], stats


def generate_samples(model: Any, problems: list[Problem], path: Path, spec: GenSpec,
                     on_progress: Callable[[int, int], None] | None = None) -> dict[str, list[dict]]:
    """Append missing samples (n_samples per problem) to `path`; return all samples per task.

    Each batch is appended and flushed as soon as it is decoded, so an interrupted run keeps
    what it made and a re-run generates only what is missing.
    """
    from .harness import group_samples, read_jsonl

    tok = model.tokenizer
    if tok is None:
        raise ValueError("the checkpoint has no tokenizer (tokenizer.json); evaluation needs one")
    style = resolve_style(spec.prompt_style, tok)
    if any(p.kind == "infill" for p in problems) and not tok.has_fim:
        raise ValueError("this tokenizer has no FIM tokens: infilling benchmarks need a FIM-trained model")
    have = group_samples(read_jsonl(path, what="samples file"), problems, str(path))
    counts = Counter({tid: len(v) for tid, v in have.items()})
    todo = [p for p in problems for _ in range(max(0, spec.n_samples - counts[p.task_id]))]
    total = len(problems) * spec.n_samples
    done = total - len(todo)
    if on_progress:
        on_progress(done, total)
    kwargs = spec.decoder_kwargs()
    for start in range(0, len(todo), spec.batch_size):
        batch = todo[start:start + spec.batch_size]
        texts, stats = _decode_batch(model, batch, style, kwargs, spec.seed + start,
                                     spec.stop_after_code and style == "instruct")
        records = [_to_sample(problem, style, text, st) for problem, text, st in zip(batch, texts, stats, strict=True)]
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
        done += len(batch)
        if on_progress:
            on_progress(done, total)
    return group_samples(read_jsonl(path, what="samples file"), problems, str(path))
