"""Pretraining data: the corpus walk tokenized into memory-mapped token shards, and reading them back.

Documents are stored as `<bos> text <eos>` back to back; readers cut the stream into fixed
windows (documents may see each other, as in the recipe's packed sequences). The directory
layout and manifest are described in datadir.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import CODE_EXTENSIONS, CorpusFile, collect_corpus
from diffcoder.fsutil import refuse_overwrite, staged_dir

from .datadir import (FORMAT, load_tokenizer, progress_bar, split_by_hash, token_dtype,
                      tokenizer_info, write_manifest)

TOKENIZE_BATCH = 64  # files per call: the fast tokenizer parallelises a batch


class ShardWriter:
    """Append-only token shards of at most `shard_tokens` ids each."""

    def __init__(self, out: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.prefix, self.dtype, self.shard_tokens = out, prefix, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh = None
        self._n = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._fh is None or self._n >= self.shard_tokens:
                self._open()
            take = min(len(ids), self.shard_tokens - self._n)
            self._fh.write(ids[:take].tobytes())
            self._n += take
            self.shards[-1]["tokens"] = self._n
            ids = ids[take:]

    def _open(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):05d}.bin"
        self._fh = open(self.out / name, "wb")
        self._n = 0
        self.shards.append({"path": name, "tokens": 0})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @property
    def total(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def build_pretrain(sources: list[Path] | None, tokenizer_dir: str | Path, out: str | Path, *,
                   val_fraction: float = 0.01, extensions: tuple[str, ...] = CODE_EXTENSIONS,
                   max_file_bytes: int = 1_000_000, max_files: int | None = None,
                   shard_tokens: int = 50_000_000, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Walk, filter, dedupe, split, tokenize and write shards; returns the manifest."""
    refuse_overwrite(out, overwrite, "--overwrite")  # before the slow part
    tok = load_tokenizer(tokenizer_dir)
    srcs, files, stats = collect_corpus(sources, extensions, max_file_bytes, max_files)
    splits = split_by_hash(files, [f.sha256 for f in files], val_fraction)
    dtype = token_dtype(tok.vocab_size)
    with staged_dir(Path(out)) as tmp:
        manifest_splits, file_rows = _tokenize_splits(tok, splits, tmp, dtype, shard_tokens, progress)
        if manifest_splits["train"]["tokens"] == 0:
            raise ValueError("empty corpus: no training tokens after the split (lower --val-fraction)")
        tok.hf.save_pretrained(str(tmp / "tokenizer"))
        with open(tmp / "files.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in file_rows)
        manifest = {"format": FORMAT, "kind": "pretrain", "dtype": dtype.name,
                    "tokenizer": tokenizer_info(tok, tokenizer_dir), "sources": [str(s) for s in srcs],
                    "files_seen": stats.seen, "files_kept": stats.kept, "skipped": stats.skipped,
                    "settings": {"val_fraction": val_fraction, "max_file_bytes": max_file_bytes,
                                 "max_files": max_files, "extensions": list(extensions)},
                    "splits": manifest_splits}
        write_manifest(tmp, manifest)
    return manifest


def _tokenize_splits(tok: Any, splits: dict[str, list[CorpusFile]], tmp: Path, dtype: np.dtype,
                     shard_tokens: int, progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each split's shards: (manifest entry per split, one files.jsonl row per written file)."""
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("tokenizing", total=sum(len(v) for v in splits.values()))
        for split, files in splits.items():
            writer = ShardWriter(tmp, split, dtype, shard_tokens)
            n_files = 0
            for i in range(0, len(files), TOKENIZE_BATCH):
                batch = files[i:i + TOKENIZE_BATCH]
                for f, doc in _documents(tok, batch):
                    writer.write(doc)
                    rows.append({"path": str(f.path), "sha256": f.sha256, "split": split, "tokens": len(doc)})
                    n_files += 1
                bar.advance(task, len(batch))
            writer.close()
            result[split] = {"files": n_files, "tokens": writer.total, "shards": writer.shards}
    return result, rows


def _documents(tok: Any, files: list[CorpusFile]) -> list[tuple[CorpusFile, np.ndarray]]:
    """(file, `<bos> ids <eos>`) for each file still as walked (a file changed mid-build is left out)."""
    texts = [(f, f.read_text()) for f in files]
    kept = [(f, t) for f, t in texts if t is not None]
    if not kept:
        return []
    encoded = tok.hf([t for _, t in kept], add_special_tokens=False)["input_ids"]
    bos = [tok.bos_id] if tok.bos_id is not None else []
    return [(f, np.asarray([*bos, *ids, tok.eos_id], dtype=np.int64)) for (f, _), ids in zip(kept, encoded)]


class PretrainSplit:
    """One split of a pretraining data dir: a token stream cut into windows of seq_len."""

    def __init__(self, datadir: str | Path, split: str, manifest: dict[str, Any]) -> None:
        self.dir = Path(datadir)
        info = manifest["splits"][split]
        dtype = np.dtype(manifest["dtype"])
        self.shards = [np.memmap(self.dir / s["path"], dtype=dtype, mode="r") for s in info["shards"]
                       if s["tokens"] > 0]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.tokens = int(self.offsets[-1])

    def n_windows(self, seq_len: int) -> int:
        return self.tokens // seq_len

    def window(self, k: int, seq_len: int) -> np.ndarray:
        """Tokens [k*L, (k+1)*L) of the stream, across shard boundaries when needed."""
        lo, hi = k * seq_len, (k + 1) * seq_len
        out = []
        s = int(np.searchsorted(self.offsets, lo, side="right") - 1)
        while lo < hi:
            base = self.offsets[s]
            take = min(hi, self.offsets[s + 1]) - lo
            out.append(np.asarray(self.shards[s][lo - base:lo - base + take]))
            lo += take
            s += 1
        return np.concatenate(out).astype(np.int64)
