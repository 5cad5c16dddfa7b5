"""SFT data: JSONL samples -> rendered token ids + loss mask in a data directory, and reading them.

A JSONL line is either a chat, `{"messages": [{"role": ..., "content": ...}, ...]}` (loss on the
assistant replies), or a fill-in-the-middle sample, `{"fim": {"prefix": P, "middle": M,
"suffix": S}}` (loss on M), rendered in the tokenizer's own FIM order as at inference
(`Tokenizer.fim_prompt`).

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
Fim = dict[str, str]  # {"prefix", "middle", "suffix"}
Sample = Conversation | Fim
ROLES = ("system", "user", "assistant")
FIM_PARTS = ("prefix", "middle", "suffix")


def read_samples(paths: list[Path]) -> list[Sample]:
    """Validated samples (conversations and FIM samples); errors name the file and line."""
    samples = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--src {path}: no such file (expected SFT JSONL, gzipped or not)")
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                samples.append(_sample(line, f"{path}:{n}"))
    return samples


def is_fim(sample: Sample) -> bool:
    return isinstance(sample, dict)


def fim_document(fim: Fim) -> str:
    """The text a FIM sample was cut from: prefix + middle + suffix."""
    return fim["prefix"] + fim["middle"] + fim["suffix"]


def _sample(line: str, where: str) -> Sample:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if isinstance(obj, dict) and "fim" in obj:
        return _fim(obj["fim"], where)
    return _conversation(obj, where)


def _fim(fim: Any, where: str) -> Fim:
    """A FIM sample, checked: the three parts as strings, and a middle to learn."""
    if not isinstance(fim, dict) or not all(isinstance(fim.get(k), str) for k in FIM_PARTS):
        raise ValueError(f"{where}: expected {{\"fim\": {{\"prefix\": str, \"middle\": str, \"suffix\": str}}}}")
    if not fim["middle"].strip():
        raise ValueError(f"{where}: the FIM middle is empty (nothing to learn from)")
    return {k: fim[k] for k in FIM_PARTS}


def _conversation(obj: Any, where: str) -> Conversation:
    """One JSONL line's messages, checked: roles, string contents, a prompt first, a reply to learn."""
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} "
                         f"or {{\"fim\": {{\"prefix\": ..., \"middle\": ..., \"suffix\": ...}}}}")
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


def render_fim(tok: Any, fim: Fim) -> tuple[list[int], list[int]]:
    """(ids, loss mask) for one FIM sample: the infilling prompt exactly as `diffcoder.infill` builds
    it, then the middle (the trainer appends the EOS that ends it, as after a chat)."""
    prompt = tok.fim_prompt(fim["prefix"], fim["suffix"])
    middle = tok.encode(fim["middle"])
    return prompt + middle, [0] * len(prompt) + [1] * len(middle)


def render(tok: Any, sample: Sample) -> tuple[list[int], list[int]]:
    return render_fim(tok, sample) if is_fim(sample) else render_chat(tok, sample)


def build_sft(sources: list[Path], tokenizer_dir: str | Path, out: str | Path, *, val_fraction: float = 0.02,
              overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """SFT JSONL (chats, FIM samples) -> tokens + loss-mask arrays + sample index, split by sample hash."""
    refuse_overwrite(out, overwrite, "--overwrite")  # before the slow part
    tok = load_tokenizer(tokenizer_dir)
    samples = read_samples([Path(s) for s in sources])
    if not samples:
        raise ValueError(f"empty SFT set: no samples in {', '.join(map(str, sources))}")
    _check_tokenizer(tok, tokenizer_dir, samples)
    digests = [hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest() for x in samples]
    parts = split_by_hash(samples, digests, val_fraction)
    dtype = token_dtype(tok.vocab_size)
    with staged_dir(Path(out)) as tmp:
        splits = {}
        with progress_bar(disable=not progress) as bar:
            task = bar.add_task("tokenizing samples", total=len(samples))
            for split, split_samples in parts.items():
                splits[split] = _write_split(tok, split_samples, tmp, split, dtype, lambda: bar.advance(task))
        if splits["train"]["samples"] == 0:
            raise ValueError("empty SFT set: no training samples after the split (lower --val-fraction)")
        tok.hf.save_pretrained(str(tmp / "tokenizer"))
        manifest = {"format": FORMAT, "kind": "sft", "dtype": dtype.name,
                    "tokenizer": tokenizer_info(tok, tokenizer_dir), "sources": [str(s) for s in sources],
                    "settings": {"val_fraction": val_fraction}, "splits": splits}
        write_manifest(tmp, manifest)
    return manifest


def _check_tokenizer(tok: Any, tokenizer_dir: str | Path, samples: list[Sample]) -> None:
    """Chats need a chat template, FIM samples FIM tokens: say so before any work."""
    if not tok.has_chat_template and any(not is_fim(x) for x in samples):
        raise ValueError(f"--tokenizer {tokenizer_dir}: no chat template in tokenizer_config.json")
    if not tok.has_fim and any(is_fim(x) for x in samples):
        raise ValueError(f"--tokenizer {tokenizer_dir}: the data holds FIM samples, but the tokenizer has no "
                         "FIM tokens (<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|> or our <[fim-...]>)")


def _write_split(tok: Any, samples: list[Sample], tmp: Path, split: str, dtype: np.dtype,
                 tick: Callable[[], Any]) -> dict[str, Any]:
    """One split's token, mask and index files; returns its manifest entry."""
    index = []
    start = 0
    with open(tmp / f"{split}-tokens.bin", "wb") as ft, open(tmp / f"{split}-mask.bin", "wb") as fm:
        for sample in samples:
            ids, mask = render(tok, sample)
            ft.write(np.asarray(ids, dtype=dtype).tobytes())
            fm.write(np.asarray(mask, dtype=np.uint8).tobytes())
            index.append((start, len(ids)))
            start += len(ids)
            tick()
    np.save(tmp / f"{split}-index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 2))
    return {"samples": len(samples), "fim_samples": sum(map(is_fim, samples)), "tokens": start,
            "tokens_file": f"{split}-tokens.bin", "mask_file": f"{split}-mask.bin", "index_file": f"{split}-index.npy"}


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
