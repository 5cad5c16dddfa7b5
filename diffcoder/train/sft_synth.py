"""Offline SFT sets from source files: "signature + docstring -> implementation" chats, and
line-level fill-in-the-middle samples.

`synthesize` (`diffcoder data sft-synth`) reads only the files of a corpus's *train* split
(files.jsonl of a `data build` directory), so the validation files stay unseen; no benchmark
problem is involved. Each documented Python function becomes one chat: the user shows the
signature and docstring, the assistant answers with the complete function in a fenced code block.
`fim_samples` cuts `{"fim": ...}` samples for `data sft` from the functions of the files given.
"""
from __future__ import annotations

import ast
import json
import random
from pathlib import Path
from typing import Any, Iterator

from diffcoder.fsutil import atomic_write_text

PROMPT = "Implement this Python function.\n\n```python\n{stub}\n```"


def _segment(lines: list[str], node: ast.AST) -> str | None:
    """ast.get_source_segment on pre-split lines: that function re-splits the whole file on every
    call, which makes a large module's hundreds of functions quadratic."""
    if getattr(node, "end_lineno", None) is None or node.end_lineno > len(lines):
        return None
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:  # offsets are in UTF-8 bytes
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode(errors="replace")
    parts = [lines[first].encode()[node.col_offset:].decode(errors="replace"), *lines[first + 1:last],
             lines[last].encode()[:node.end_col_offset].decode(errors="replace")]
    return "\n".join(parts)


def _stub(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """`def name(args) -> ret:` plus the docstring, as written in the file (dedented)."""
    doc_node = fn.body[0]
    doc_seg = _segment(lines, doc_node)
    if doc_seg is None or fn.end_lineno is None or fn.end_lineno > len(lines):
        return None
    head = lines[fn.lineno - 1:doc_node.lineno - 1]  # decorators are not part of fn.lineno
    indent = len(lines[fn.lineno - 1]) - len(lines[fn.lineno - 1].lstrip())
    body_indent = " " * (doc_node.col_offset - indent)
    stub = [line[indent:] for line in head] + [body_indent + doc_seg.replace("\n" + " " * doc_node.col_offset,
                                                                            "\n" + body_indent)]
    return "\n".join(stub)


def _function_text(fn: ast.AST, lines: list[str]) -> str:
    start, end = fn.lineno - 1, fn.end_lineno
    indent = len(lines[start]) - len(lines[start].lstrip())
    return "\n".join(line[indent:] for line in lines[start:end])


def _functions(path: Path) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, list[str]]]:
    """Every function of a Python file (methods and nested ones too) with the file's lines;
    nothing for a file that does not parse."""
    try:
        source = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        tree = ast.parse(source)
        lines = source.split("\n")  # ast's line numbers count "\n" only (not \x0c etc.)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            yield node, lines


def iter_examples(path: Path, max_chars: int) -> Iterator[dict[str, Any]]:
    for node, lines in _functions(path):
        if len(node.body) < 2:
            continue
        if not ast.get_docstring(node) or node.name.startswith("test"):
            continue
        body = _function_text(node, lines)
        if len(body) > max_chars:
            continue
        stub = _stub(node, lines)
        if stub is None or len(stub) >= len(body):
            continue
        yield {"messages": [{"role": "user", "content": PROMPT.format(stub=stub)},
                            {"role": "assistant", "content": f"```python\n{body}\n```"}]}


def synthesize(datadir: str | Path, out: str | Path, max_samples: int = 2000, max_chars: int = 1500) -> int:
    """Write chat JSONL from the train-split .py files of a data directory; returns the count."""
    listing = Path(datadir) / "files.jsonl"
    if not listing.exists():
        raise FileNotFoundError(f"--data {datadir}: no files.jsonl (a `diffcoder data build` directory is needed)")
    files = [json.loads(l) for l in listing.read_text().splitlines() if l.strip()]
    train_py = [Path(f["path"]) for f in files if f["split"] == "train" and f["path"].endswith(".py")]
    chats: list[str] = []
    for path in train_py:
        for ex in iter_examples(path, max_chars):
            chats.append(json.dumps(ex, ensure_ascii=False))
            if len(chats) >= max_samples:
                break
        if len(chats) >= max_samples:
            break
    if not chats:
        raise ValueError(f"--data {datadir}: no documented Python functions in the train split")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(chats) + "\n")
    return len(chats)


def fim_samples(sources: list[Path], n: int, seed: int, max_chars: int = 1200, max_lines: int = 6,
                exclude: frozenset[str] = frozenset()) -> list[dict]:
    """Up to n fill-in-the-middle samples, `{"fim": {"prefix", "middle", "suffix"}}`, one per function,
    none from a function in `exclude` (prefix + middle + suffix of an earlier set's samples).

    Cut as HumanEval's infilling benchmarks cut theirs: the document is one whole function
    (dedented, as a top-level one), the middle is whole lines of its body after the docstring:
    one line in half of the samples (single-line infilling), 2 to `max_lines` in the others
    (multi-line). Functions over `max_chars`, test functions and repeated texts are left out.
    """
    rng = random.Random(seed)
    found: dict[str, int] = {}  # function text -> the body's first line after the docstring
    for path in sources:
        for fn, lines in _functions(path):
            text = _function_text(fn, lines)
            if len(text) <= max_chars and not fn.name.startswith("test") and text + "\n" not in exclude:
                body = fn.body[1:] if ast.get_docstring(fn) else fn.body
                if body and body[0].lineno > fn.lineno:  # a body on the def line has no line to cut
                    found.setdefault(text, body[0].lineno - fn.lineno)
    texts = list(found)
    rng.shuffle(texts)
    out = []
    for text in texts:
        sample = _cut_lines(text, found[text], rng, max_lines)
        if sample is not None:
            out.append({"fim": sample})
            if len(out) == n:
                break
    return out


def _cut_lines(text: str, first_body_line: int, rng: random.Random, max_lines: int) -> dict[str, str] | None:
    """prefix + middle + suffix == the function's text plus a final newline; the middle starts
    on a non-blank body line and holds 1 (half the time) to max_lines whole lines."""
    lines = [line + "\n" for line in text.split("\n")]
    starts = [i for i in range(first_body_line, len(lines)) if lines[i].strip()]
    if not starts:
        return None
    i = rng.choice(starts)
    j = min(len(lines), i + (1 if rng.random() < 0.5 else rng.randint(2, max_lines)))
    while j > i + 1 and not lines[j - 1].strip():  # a middle ends on code, as the benchmarks' do
        j -= 1
    return {"prefix": "".join(lines[:i]), "middle": "".join(lines[i:j]), "suffix": "".join(lines[j:])}
