"""Benchmark contamination check: word n-gram overlap between training text and the evaluation sets.

A training text is flagged when it shares any n-gram (default 10 words, lower-cased, split on
non-word characters) with a HumanEval or MBPP problem's prompt, solution or tests: the 13-gram
test of GPT-3's paper, shortened because code problems are short. Flagged texts are dropped
before training; the report says how many and where they matched.
"""
from __future__ import annotations

import re
from typing import Iterable

_WORD = re.compile(r"\w+")
BENCHMARKS = ("humaneval", "mbpp", "mbpp-full")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def benchmark_ngrams(n: int, names: Iterable[str] = BENCHMARKS) -> dict[tuple[str, ...], str]:
    """Every n-gram of the benchmarks' problems -> the first task id that has it."""
    from diffcoder.eval.problems import load_benchmark

    index: dict[tuple[str, ...], str] = {}
    for name in names:
        for p in load_benchmark(name):
            for text in (p.prompt, p.instruction, p.canonical, p.test):
                for g in ngrams(text, n):
                    index.setdefault(g, p.task_id)
    return index


def overlaps(text: str, index: dict[tuple[str, ...], str], n: int) -> list[str]:
    """Task ids whose n-grams occur in `text` (sorted, distinct)."""
    return sorted({index[g] for g in ngrams(text, n) if g in index})
