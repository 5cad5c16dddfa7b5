"""Deterministic batch streams: global row r of the run is a pure function of (seed, r).

Resuming therefore needs only the number of rows consumed, and any world size reads the
same rows (each rank takes its slice of the global micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sft_data import SFTSplit
from .shards import PretrainSplit


def _memo(cache: dict, key: int, make, keep: int = 4):  # noqa: ANN001, ANN202
    """A small per-instance cache (the last few epochs' permutations / packing plans)."""
    if key not in cache:
        if len(cache) >= keep:
            cache.pop(next(iter(cache)))
        cache[key] = make(key)
    return cache[key]


@dataclass(frozen=True)
class FimSpec:
    """Fill-in-the-middle augmentation: the share of rows rewritten, the special ids it needs, and
    the tokenizer's order (`Tokenizer.fim_order`: "spm" or "psm")."""
    rate: float
    prefix_id: int
    suffix_id: int
    middle_id: int
    eos_id: int
    order: str = "spm"


def fim_rewrite(window: np.ndarray, rng: np.random.Generator, fim: FimSpec) -> np.ndarray:
    """One window in the order `Tokenizer.fim_prompt` uses for this tokenizer:

        spm: <fim-suffix> S <fim-prefix> P <fim-middle> M <eos>     (Seed-Coder, ours)
        psm: <fim-prefix> P <fim-suffix> S <fim-middle> M <eos>     (Qwen2.5-Coder, StarCoder)

    The window's first len-4 tokens are cut at two uniform token positions into P | M | S, so
    the row keeps its length; the EOS teaches the model where a middle ends.
    """
    body = window[:len(window) - 4]
    i, j = sorted(int(x) for x in rng.integers(0, len(body) + 1, size=2))
    pre, suf = [[fim.prefix_id], body[:i]], [[fim.suffix_id], body[j:]]
    head = suf + pre if fim.order == "spm" else pre + suf
    return np.concatenate([*head, [fim.middle_id], body[i:j], [fim.eos_id]]).astype(window.dtype)


class PretrainStream:
    """Windows of seq_len tokens, reshuffled every epoch; optionally a share of them FIM-rewritten.

    Whether row r is rewritten, and where it is cut, depends only on (seed, r), like the rows.
    """

    def __init__(self, split: PretrainSplit, seq_len: int, seed: int, shuffle: bool = True,
                 fim: FimSpec | None = None) -> None:
        self.split, self.seq_len, self.seed, self.shuffle, self.fim = split, seq_len, seed, shuffle, fim
        if fim is not None and seq_len < 8:
            raise ValueError(f"FIM rewriting needs --seq-len >= 8, got {seq_len}")
        self.n = split.n_windows(seq_len)
        self._perms: dict[int, np.ndarray] = {}
        if self.n == 0:
            raise ValueError(f"the data has {split.tokens} tokens, fewer than one --seq-len {seq_len} window; "
                             "lower --seq-len or add data")

    def _perm(self, epoch: int) -> np.ndarray:
        return _memo(self._perms, epoch, self._make_perm)

    def _make_perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def rows(self, start: int, count: int) -> tuple[np.ndarray, None]:
        out = np.empty((count, self.seq_len), dtype=np.int64)
        for j in range(count):
            epoch, k = divmod(start + j, self.n)
            out[j] = self.split.window(int(self._perm(epoch)[k]), self.seq_len)
            if self.fim is not None and self.fim.rate > 0:
                rng = np.random.default_rng([self.seed, 2, start + j])
                if rng.random() < self.fim.rate:
                    out[j] = fim_rewrite(out[j], rng, self.fim)
        return out, None


class SFTStream:
    """Whole chat samples packed greedily into rows, each followed by 1-4 random EOS.

    The appended EOS carry loss (the model learns to end at variable lengths); the rest of a
    row is padding with no loss. A sample longer than a row is cut to the row length.
    """

    def __init__(self, split: SFTSplit, seq_len: int, seed: int, eos_id: int, pad_id: int,
                 min_eos: int = 1, max_eos: int = 4, shuffle: bool = True) -> None:
        if len(split) == 0:
            raise ValueError("the SFT split has no samples")
        if not 0 <= min_eos <= max_eos:
            raise ValueError(f"--sft-min-eos/--sft-max-eos: need 0 <= min <= max, got {min_eos}, {max_eos}")
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.eos_id, self.pad_id, self.min_eos, self.max_eos = eos_id, pad_id, min_eos, max_eos
        self._plans: dict[int, list[list[tuple[int, int]]]] = {}
        self._counts: dict[int, int] = {}  # rows per epoch, kept for good (plans are recomputed on demand)

    def _plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        return _memo(self._plans, epoch, self._make_plan)

    def _make_plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, epoch, 1])
        order = rng.permutation(len(self.split)) if self.shuffle else np.arange(len(self.split))
        n_eos = rng.integers(self.min_eos, self.max_eos + 1, size=len(order))
        rows: list[list[tuple[int, int]]] = [[]]
        used = 0
        for i, e in zip(order, n_eos):
            size = min(self.seq_len, int(self.split.index[i][1]) + int(e))
            if used + size > self.seq_len and rows[-1]:
                rows.append([])
                used = 0
            rows[-1].append((int(i), int(e)))
            used += size
        return rows

    def _locate(self, r: int) -> tuple[int, int]:
        epoch = 0
        while True:
            if epoch not in self._counts:
                self._counts[epoch] = len(self._plan(epoch))
            n = self._counts[epoch]
            if r < n:
                return epoch, r
            r -= n
            epoch += 1

    def rows(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        toks = np.full((count, self.seq_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((count, self.seq_len), dtype=bool)
        for j in range(count):
            epoch, k = self._locate(start + j)
            col = 0
            for i, e in self._plan(epoch)[k]:
                ids, m = self.split.sample(i)
                ids = np.concatenate([ids, np.full(e, self.eos_id, dtype=np.int64)])[:self.seq_len - col]
                m = np.concatenate([m, np.ones(e, dtype=bool)])[:len(ids)]
                toks[j, col:col + len(ids)] = ids
                mask[j, col:col + len(ids)] = m
                col += len(ids)
        return toks, mask
