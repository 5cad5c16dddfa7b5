"""The machine: CPU features, the device to run on and the dtype that runs well there.

Every command that takes --device / --dtype / --precision resolves it here, so "auto" means the
same thing everywhere: CUDA when present; bfloat16 where the device runs it natively, else float32.
Bad names are ValueErrors worded for the command line.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_bf16() -> bool:
    """bf16 matmuls run natively (AMX / AVX512-BF16) on this CPU."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def pick_device(name: str = "auto") -> str:
    """`name` checked against this machine; "auto" is cuda when a GPU is usable, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu or auto")
        count = torch.cuda.device_count()
        index = name.partition(":")[2]
        if index.isdigit() and int(index) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return name


def runs_bf16(device: str | torch.device) -> bool:
    """bfloat16 arithmetic is native on `device` (not emulated at a loss)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_has_bf16()


def pick_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name (float32, bfloat16, float16, float64 or fp32 / bf16 / fp16; a torch.dtype
    passes through); "auto" is bfloat16 where `device` runs it natively, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if runs_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16 (float64 for tests)")
    return DTYPES[name]


@functools.cache
def _malloc_trim() -> object | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc `malloc_trim(0)`); False where there is
    no such call.

    Why: a training step allocates tensors whose sizes change every step (the number of masked
    positions is random), and glibc serves blocks of up to 32 MiB from its heap once a block
    that size has been freed; the freed pages stay mapped between live blocks, so the process
    grows step after step although what it holds does not.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
