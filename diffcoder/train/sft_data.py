"""SFT data: chat JSONL -> rendered conversations (ids + assistant loss mask) in a data directory, and reading them.

Each split holds a token file, a mask file (uint8, 1 = loss) and an index of samples (start,
length); the directory layout and manifest are described in datadir.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffcoder.fsutil import read_text, refuse_overwrite, staged_dir

from .datadir import (FORMAT, load_tokenizer, progress_bar, split_by_hash, token_dtype,
                      tokenizer_info, write_manifest)

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


def read_chat_jsonl(paths: list[Path]) -> list[Conversation]:
    """Validated conversations; errors name the file and line."""
    convs = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--src {path}: no such file (expected chat JSONL, gzipped or not)")
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                convs.append(_conversation(line, f"{path}:{n}"))
    return convs


def _conversation(line: str, where: str) -> Conversation:
    """One JSONL line's messages, checked: roles, string contents, a prompt first, a reply to learn."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message needs role system|user|assistant and a string "
                             f"content, got {str(m)[:80]}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{where}: no assistant message (nothing to learn from)")
    if msgs[0]["role"] == "assistant":
        raise ValueError(f"{where}: the conversation starts with an assistant turn (no prompt)")
    return msgs


def render_chat(tok: Any, messages: Conversation) -> tuple[list[int], list[int]]:
    """(ids, loss mask) for one conversation; loss on assistant replies and their closing EOS.

    The text is cut where the template's generation prompt ends, and the two sides are
    tokenized separately: the reply starts on a token boundary exactly as at inference, where
    the model continues `apply_chat_template(..., add_generation_prompt=True)`.
    """
    hf = tok.hf
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        full = hf.apply_chat_template(messages[:i + 1], tokenize=False)
        if msg["role"] == "assistant":
            prompt = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the chat template is not prefix-stable; cannot locate assistant turns")
            head = tok.encode(prompt[len(done):])
            reply = tok.encode(full[len(prompt):])
            ids += head + reply
            mask += [0] * len(head) + [1] * len(reply)
        else:
            if not full.startswith(done):
                raise ValueError("the chat template is not prefix-stable; cannot locate assistant turns")
            part = tok.encode(full[len(done):])
            ids += part
            mask += [0] * len(part)
        done = full
    return ids, mask


def build_sft(sources: list[Path], tokenizer_dir: str | Path, out: str | Path, *, val_fraction: float = 0.02,
              overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Chat JSONL -> tokens + loss-mask arrays + sample index, split by conversation hash."""
    refuse_overwrite(out, overwrite, "--overwrite")  # before the slow part
    tok = load_tokenizer(tokenizer_dir)
    if not tok.has_chat_template:
        raise ValueError(f"--tokenizer {tokenizer_dir}: no chat template in tokenizer_config.json")
    convs = read_chat_jsonl([Path(s) for s in sources])
    if not convs:
        raise ValueError(f"empty SFT set: no conversations in {', '.join(map(str, sources))}")
    digests = [hashlib.sha256(json.dumps(msgs, sort_keys=True).encode()).hexdigest() for msgs in convs]
    parts = split_by_hash(convs, digests, val_fraction)
    dtype = token_dtype(tok.vocab_size)
    with staged_dir(Path(out)) as tmp:
        splits = {}
        with progress_bar(disable=not progress) as bar:
            task = bar.add_task("tokenizing chats", total=len(convs))
            for split, split_convs in parts.items():
                splits[split] = _write_split(tok, split_convs, tmp, split, dtype, lambda: bar.advance(task))
        if splits["train"]["samples"] == 0:
            raise ValueError("empty SFT set: no training conversations after the split (lower --val-fraction)")
        tok.hf.save_pretrained(str(tmp / "tokenizer"))
        manifest = {"format": FORMAT, "kind": "sft", "dtype": dtype.name,
                    "tokenizer": tokenizer_info(tok, tokenizer_dir), "sources": [str(s) for s in sources],
                    "settings": {"val_fraction": val_fraction}, "splits": splits}
        write_manifest(tmp, manifest)
    return manifest


def _write_split(tok: Any, convs: list[Conversation], tmp: Path, split: str, dtype: np.dtype,
                 tick: Callable[[], Any]) -> dict[str, Any]:
    """One split's token, mask and index files; returns its manifest entry."""
    index = []
    start = 0
    with open(tmp / f"{split}-tokens.bin", "wb") as ft, open(tmp / f"{split}-mask.bin", "wb") as fm:
        for msgs in convs:
            ids, mask = render_chat(tok, msgs)
            ft.write(np.asarray(ids, dtype=dtype).tobytes())
            fm.write(np.asarray(mask, dtype=np.uint8).tobytes())
            index.append((start, len(ids)))
            start += len(ids)
            tick()
    np.save(tmp / f"{split}-index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 2))
    return {"samples": len(convs), "tokens": start, "tokens_file": f"{split}-tokens.bin",
            "mask_file": f"{split}-mask.bin", "index_file": f"{split}-index.npy"}


class SFTSplit:
    """One split of an SFT data dir: variable-length samples with loss masks."""

    def __init__(self, datadir: str | Path, split: str, manifest: dict[str, Any]) -> None:
        d = Path(datadir)
        info = manifest["splits"][split]
        dtype = np.dtype(manifest["dtype"])
        self.index = np.load(d / info["index_file"]) if info["samples"] else np.zeros((0, 2), np.int64)
        n = info["tokens"]
        self.tokens = np.memmap(d / info["tokens_file"], dtype=dtype, mode="r") if n else np.zeros(0, dtype)
        self.mask = np.memmap(d / info["mask_file"], dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, length = self.index[i]
        return (np.asarray(self.tokens[start:start + length], dtype=np.int64),
                np.asarray(self.mask[start:start + length], dtype=bool))
