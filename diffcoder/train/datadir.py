"""A data directory of token ids: its layout, manifest, the tokenizer it records, and building one atomically.

Layout (built in a temporary sibling, then swapped into place, so a directory with a manifest is complete):

    manifest.json            format, kind ("pretrain" | "sft"), dtype, tokenizer fingerprint,
                             sources, counts, files per split
    pretrain (shards.py):    files.jsonl (one line per kept file: path, sha256, split, tokens),
                             train-00000.bin ..., validation-00000.bin ... (token ids, `dtype`)
    sft (sft_data.py):       {split}-tokens.bin, {split}-mask.bin (uint8, 1 = loss),
                             {split}-index.npy ([n, 2] start, length)
    tokenizer/               a copy of the tokenizer the ids belong to

`dtype` is uint16 when the vocabulary fits, else uint32.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np

from diffcoder.fsutil import atomic_write_text

FORMAT = "diffcoder-tokens-v1"
T = TypeVar("T")


# ------------------------------------------------------------------ tokenizer
def load_tokenizer(path: str | Path) -> Any:
    """The diffcoder Tokenizer at `path`, refused when it cannot separate documents (no eos)."""
    from diffcoder.tokenizer import Tokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"--tokenizer {path}: no tokenizer.json there (train one with "
                                "`diffcoder tokenizer train`)")
    tok = Tokenizer.from_dir(path)
    if tok.eos_id is None:  # documents are separated by EOS; bos is optional, the mask is checked by `train`
        raise ValueError(f"--tokenizer {path}: has no eos token (documents are separated by it); "
                         "use `diffcoder tokenizer train` or a tokenizer with an eos_token")
    return tok


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides the ids (vocabulary, merges, added tokens), not of file formatting.

    `tokenizer` is a diffcoder Tokenizer; the same tokenizer re-saved by transformers keeps
    its fingerprint, so data and checkpoints can be matched reliably.
    """
    raw = json.loads(tokenizer.hf.backend_tokenizer.to_str())
    added = sorted((t["id"], t["content"]) for t in raw.get("added_tokens", []))
    blob = json.dumps({"model": raw.get("model"), "added": added}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_info(tokenizer: Any, path: Path | str) -> dict[str, Any]:
    """The manifest's record of the tokenizer the ids belong to."""
    return {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "mask_id": tokenizer.mask_id, "source": str(path)}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


# ------------------------------------------------------------------ splitting
def split_by_hash(items: Sequence[T], digests: Sequence[str], val_fraction: float) -> dict[str, list[T]]:
    """Train/validation by each item's content hash: deterministic and independent of where the
    items came from; at least one validation item when a fraction is asked for (and two items exist).
    Items with equal hashes land on the same side."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    keys = [int(d[:12], 16) / float(16 ** 12) for d in digests]  # a number in [0, 1) per item
    held_out = [k < val_fraction for k in keys]
    if val_fraction > 0 and not any(held_out) and len(items) >= 2:
        lowest = min(keys)
        held_out = [k == lowest for k in keys]
    return {"train": [x for x, h in zip(items, held_out) if not h],
            "validation": [x for x, h in zip(items, held_out) if h]}


# ------------------------------------------------------------------ writing
def write_manifest(datadir: Path, manifest: dict[str, Any]) -> None:
    """Written last: a directory with a manifest is complete."""
    atomic_write_text(datadir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def progress_bar(disable: bool = False) -> Any:
    """The tokenizing progress bar (shown only on a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=disable or not sys.stderr.isatty(), console=None)


# ------------------------------------------------------------------ reading
def read_manifest(datadir: str | Path) -> dict[str, Any]:
    path = Path(datadir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"--data {datadir}: no manifest.json (build it with `diffcoder data build` or "
                                "`diffcoder data sft`; an interrupted build leaves no manifest)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest
