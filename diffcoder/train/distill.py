"""Self-distillation data: an autoregressive model writes the instructions and answers that its
block-diffusion successor is then fine-tuned on.

Why: a parallel decoder learns far more easily from a teacher's own outputs than from human
text (sequence-level distillation, Kim & Rush 2016; the standard recipe of non-autoregressive
decoders, Gu et al. 2018): the targets are the teacher's modes, less multimodal, and already
within what the model can predict, so a small training budget goes into learning to decode
under masks rather than into learning new content.

Two kinds of instructions, both made offline:
* **stubs**: a documented function of a source tree (signature + docstring, as `data sft-synth`
  takes them) with "Implement this Python function."; the teacher writes the implementation;
* **self-instruct** (Magpie, Xu et al. 2024): the chat template up to the user turn, plus an
  opener such as "Write a Python function that", is continued by the teacher at temperature
  0.8; the first paragraph of each user turn becomes an instruction.
The answers are greedy (what the evaluation decodes). Chats whose answer hit the length limit are
dropped: they teach neither a complete program nor where to stop.

Files (resumable: rerunning continues where a run stopped):
    OUT/prompts.jsonl   {"id", "source", "prompt"}            (written once, atomically)
    OUT/chats.jsonl     {"id", "source", "messages": [...]}   (appended per batch)
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from diffcoder.fsutil import atomic_write_text, read_text

OPENERS = (
    "Write a Python function that", "Write a Python function to", "Write a Python program that",
    "Implement a Python class", "Write a function that takes a list", "Write a function that takes a string",
    "Given a list of integers,", "Given a string,", "Create a Python function", "How do I",
    "Write a Python script that", "Implement a function", "Write a recursive function", "Write a generator",
    "Explain what this Python code does and", "Fix the bug in this Python function:", "Write a Python function using",
    "Write an efficient algorithm", "Write a Python function that checks whether", "Write a function to find",
    "Write a Python function that returns", "Write a Python function that counts", "Write a Python function that sorts",
    "Implement binary search", "Write a Python function that parses", "Write a Python decorator",
    "Write a Python function that converts", "Write a Python function that computes",
)
_STUB_INSTRUCTION = "Implement this Python function.\n\n```python\n{stub}\n```"


def _mostly_ascii(text: str, share: float = 0.97) -> bool:
    return bool(text) and sum(c.isascii() for c in text) >= share * len(text)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def prompt_key(text: str) -> str:
    """What makes two instructions the same: their first 12 words, case and spacing aside."""
    return " ".join(_norm(text).split()[:12])


def stub_prompts(sources: Iterable[Path], n: int, seed: int, max_chars: int = 1500,
                 exclude: frozenset[str] = frozenset()) -> list[str]:
    """Up to n "implement this function" instructions from documented functions in .py files,
    none of them in `exclude` (an earlier data set's instructions)."""
    from .sft_synth import iter_examples

    found: dict[str, None] = {}
    for path in sources:
        for ex in iter_examples(path, max_chars):
            user = ex["messages"][0]["content"]
            if _mostly_ascii(user) and user not in exclude:
                found.setdefault(user)
    prompts = list(found)
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def _decode_texts(model: Any, prompts: list[list[int]], gen_length: int, temperature: float,
                  seed: int) -> list[tuple[str, bool]]:
    """(text, reached EOS) per prompt: greedy or sampled AR decoding (block length 1 with shift)."""
    import diffcoder

    tok = model.tokenizer
    res = diffcoder.generate(model, prompts, steps=gen_length, gen_length=gen_length, block_length=1, shift=True,
                             temperature=temperature, eos_id=tok.eos_id, seed=seed)
    out = []
    for ids, reason in zip(res.tokens, res.finish_reasons):
        ended = reason == "stop" and bool(ids) and ids[-1] == tok.eos_id
        out.append((tok.decode(ids[:-1] if ended else ids, skip_special_tokens=False), ended))
    return out


def first_paragraph(text: str, ended: bool) -> str | None:
    """The user turn's first paragraph: self-instructed turns tend to go on with code and
    examples; the first paragraph is the task. None when it was cut by the length limit."""
    cut = [i for i in (text.find("\n\n"), text.find("<|")) if i >= 0]
    if cut:
        return text[:min(cut)].strip()
    return text.strip() if ended else None


def self_instruct_prompts(model: Any, n: int, seed: int, batch_size: int = 32, max_tokens: int = 80,
                          temperature: float = 0.8, on_progress: Callable[[int, int], None] | None = None,
                          exclude: frozenset[str] = frozenset(), progress_file: Path | None = None) -> list[str]:
    """Up to n distinct English user turns, written by the model from the openers (Magpie), none
    the same (`prompt_key`) as an instruction in `exclude`.

    `progress_file`: each batch's accepted turns are appended there as the batch ends, and a call
    with the same arguments continues after the batches it holds: a batch's openers and sampling
    seed depend only on the batches before it, so the result is the uninterrupted run's."""
    tok = model.tokenizer
    head = tok.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=False)
    text = tok.decode(head, skip_special_tokens=False)
    before_user = text[:text.index("\x00")]  # the template up to where the user's words begin
    rng = random.Random(seed)
    seen = {prompt_key(p) for p in exclude}
    out: list[str] = []
    attempts = 0
    settings = [seed, batch_size, max_tokens, temperature]
    done = {r["batch"]: r["prompts"] for r in (read_jsonl(progress_file) if progress_file else [])
            if r.get("settings") == settings}
    while len(out) < n and attempts < 4 * n:
        openers = [rng.choice(OPENERS) for _ in range(batch_size)]
        batch = attempts // batch_size
        if batch in done:
            kept = done[batch]
        else:
            ids = [tok.encode(before_user + o) for o in openers]
            texts = _decode_texts(model, ids, max_tokens, temperature, seed + attempts)
            kept = [p for o, (cont, ended) in zip(openers, texts) if (p := _instruction(o + cont, ended))]
            if progress_file:
                _append_line(progress_file, json.dumps({"batch": batch, "settings": settings, "prompts": kept},
                                                       ensure_ascii=False))
        attempts += batch_size
        for prompt in kept:
            key = prompt_key(prompt)
            if key not in seen:
                seen.add(key)
                out.append(prompt)
        if on_progress:
            on_progress(min(len(out), n), n)
    return out[:n]


def _append_line(path: Path, line: str) -> None:
    """Append one line, on a line of its own even after a line an interrupted writer cut."""
    with open(path, "ab+") as fh:  # writes go to the end whatever the read position
        size = fh.seek(0, 2)
        cut = size > 0 and fh.seek(size - 1) >= 0 and fh.read(1) != b"\n"
        fh.write((b"\n" if cut else b"") + line.encode("utf-8") + b"\n")


def _instruction(text: str, ended: bool) -> str | None:
    """A self-instructed turn's task, or None when it is cut, code, a lead-in or too short."""
    para = first_paragraph(text, ended)
    if para is None or para.endswith(":") or "```" in para or len(para) < 40 or not _mostly_ascii(para):
        return None
    return para


def write_prompts(path: Path, prompts: list[tuple[str, str]]) -> None:
    atomic_write_text(path, "".join(json.dumps({"id": i, "source": s, "prompt": p}, ensure_ascii=False) + "\n"
                                    for i, (s, p) in enumerate(prompts)))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file, gzipped (a `.gz` name) or not; none when it does not exist."""
    if not path.exists():
        return []
    rows = []
    for line in read_text(path, errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run: that batch is made again
    return rows


def answer_prompts(model: Any, prompts: list[dict], out: Path, gen_length: int = 384, batch_size: int = 32,
                   seed: int = 0, on_progress: Callable[[int, int], None] | None = None) -> int:
    """Append greedy answers to out (skipping ids already there or already tried); returns chats kept."""
    tok = model.tokenizer
    tried_path = out.with_name(out.name + ".tried")
    tried = {int(x) for x in tried_path.read_text().split()} if tried_path.exists() else set()
    tried |= {r["id"] for r in read_jsonl(out)}
    todo = [p for p in prompts if p["id"] not in tried]
    # Similar prompt lengths share a batch (less padding), within chunks of the file's order, so a
    # run stopped early still holds a sample of every source.
    chunk = 8 * batch_size
    todo = [p for c in range(0, len(todo), chunk) for p in sorted(todo[c:c + chunk], key=lambda p: len(p["prompt"]))]
    done = len(prompts) - len(todo)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        ids = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in batch]
        texts = _decode_texts(model, ids, gen_length, 0.0, seed)
        chats = [{"id": p["id"], "source": p["source"],
                  "messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": t}]}
                 for p, (t, ended) in zip(batch, texts) if ended and t.strip()]
        with open(out, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
        with open(tried_path, "a") as fh:
            fh.write("".join(f"{p['id']}\n" for p in batch))
        done += len(batch)
        if on_progress:
            on_progress(done, len(prompts))
    return len(read_jsonl(out))
