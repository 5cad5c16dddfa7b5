"""Which kernels a process runs: one `KernelPolicy`, read from the environment once at import.

`current_policy()` is the one place the model, the decoder and the kernel dispatch read it;
`using_policy(...)` changes it for a block (tests, benchmarks) and restores it afterwards.
A compiled step reads the policy while it is traced, so torch.compile guards on it: a step run
under another policy is traced again, and the traces of both are kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

# auto: AMX where it works; else, where bf16 products are emulated (no avx512_bf16), the AVX-512
# kernel; oneDNN for the rest.
MATMUL_KERNELS = ("auto", "amx", "avx512", "onednn")
SWITCHES = ("auto", "torch")  # auto: the native op where it works; torch: torch's ops
FOLDING = ("auto", "on", "off")  # auto: the device type's default (FOLDS_BY_DEFAULT)
# The environment variable each policy field starts from.
ENV = {"matmul": "DIFFCODER_CPU_MATMUL", "attention": "DIFFCODER_CPU_ATTENTION",
       "confidence": "DIFFCODER_CPU_CONFIDENCE"}
# Device types whose inference attention folds each KV head's group of query heads into one query
# (GQA) under fold_query_groups="auto". CPU: SDPA's per-(batch, head) overhead dominates a 4-token
# decode query, and the folded calls give bit-identical results (tests/test_model.py). CUDA: the
# plain call takes SDPA's math path (GQA with a mask), the folded one a fused kernel, faster at
# batch 16 (`benchmarks/decode_speed.py --fold-query-groups`, RESULTS.md); it stays off there until
# float32 decode checks with folding on pass in a full GPU test run (docs/decoding.md, *Runners
# and numerics*).
FOLDS_BY_DEFAULT = frozenset({"cpu"})


@dataclass(frozen=True)
class KernelPolicy:
    """`matmul`: the bf16 CPU matmul kernel of a packed decode ("auto", "amx" or "avx512": an error
    where that kernel does not work, "onednn": bit-identical to F.linear); `attention`, `confidence`: whether a CPU
    decode step's attention and greedy float64 confidences may run on the native ops ("auto") or
    stay on torch's ("torch"); `fold_query_groups`: whether inference attention folds query-head
    groups ("auto": per device type, "on", "off")."""
    matmul: str = "auto"
    attention: str = "auto"
    confidence: str = "auto"
    fold_query_groups: str = "auto"

    def __post_init__(self) -> None:
        for name, choices in (("matmul", MATMUL_KERNELS), ("attention", SWITCHES), ("confidence", SWITCHES),
                              ("fold_query_groups", FOLDING)):
            value = getattr(self, name)
            if value not in choices:
                source = f" (${ENV[name]})" if name in ENV else ""
                raise ValueError(f"kernel policy {name}={value!r}{source} is not one of {', '.join(choices)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KernelPolicy:
        """The policy the environment sets ($DIFFCODER_CPU_MATMUL, ...; unset: auto)."""
        return cls(**{name: environ[var] for name, var in ENV.items() if var in environ})

    def folds_query_groups(self, device_type: str) -> bool:
        if self.fold_query_groups == "auto":
            return device_type in FOLDS_BY_DEFAULT
        return self.fold_query_groups == "on"


_current = KernelPolicy.from_env()


def current_policy() -> KernelPolicy:
    return _current


@contextlib.contextmanager
def using_policy(**changes: str) -> Iterator[KernelPolicy]:
    """The current policy with `changes` (field=value) for the block; the previous one afterwards."""
    global _current
    previous = _current
    _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous
