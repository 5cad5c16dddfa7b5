"""An offline SFT set from a pretraining corpus: "signature + docstring -> implementation".

Only files of the corpus's *train* split are used (files.jsonl of a `data build` directory), so
the validation files stay unseen; no benchmark problem is involved. Each documented Python
function becomes one chat: the user shows the signature and docstring, the assistant answers
with the complete function in a fenced code block.
"""
from __future__ import annotations

import ast
import json
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


def iter_examples(path: Path, max_chars: int) -> Iterator[dict[str, Any]]:
    try:
        source = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        tree = ast.parse(source)
        lines = source.split("\n")  # ast's line numbers count "\n" only (not \x0c etc.)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
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
