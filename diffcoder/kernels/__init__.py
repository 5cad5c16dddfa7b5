"""Native CPU kernels, compiled on first use and cached per machine, in two libraries.

The AMX library (CPUs with AMX), three sources:

- `amx_linear.cpp`: bf16 y = x W^T for up to `AMX_MAX_ROWS` rows on CPUs with AMX, the shape of
  every matmul in a decode pass (a block of 4 tokens, 8 in the fused commit pass, 4 per sequence
  in a batch). `linear.packed_linear`, the matmul of a prepared bf16 CPU model, routes such calls
  here and larger ones (a prefill) to oneDNN.
- `attention.cpp`: a decode step's attention (bf16, up to `ATTENTION_MAX_ROWS` query rows with
  the query heads folded onto their KV head; AMX tile products for head sizes that are multiples
  of 32) for `diffcoder.model.Attention`, where SDPA's CPU kernel pays a large fixed cost per call
  (benchmarks/attention_kernels.py; in whole passes: benchmarks/decode_speed.py --ab-torch-ops); with fused q/k/v,
  `rope_cache_attention` also applies the rotary embedding and writes the step into the KV cache.
  Both read one mask row per token (a folded query's rows repeat the tokens' mask).
- `confidence.cpp`: the release's greedy low-confidence proposal (argmax without the mask token,
  its float64 softmax probability) in one pass over each still-masked position's logits, for
  `diffcoder.engine.rules.propose`.

The AVX-512 library (CPUs with AVX-512F), for CPUs without AMX:

- `avx512_linear.cpp`: bf16 y = x W^T with the weights widened to fp32 in registers and fp32
  FMAs, for CPUs without bf16 dot-product instructions (no AMX, no avx512_bf16), where oneDNN's
  bf16 matmul is emulated and slower than float32 (benchmarks/linear_kernels.py). It reads the
  weights in place (no packed copy), any number of rows.
- `confidence.cpp` again (AVX-512F only), its op in this library's namespace.

Which of them run is the `KernelPolicy` (policy.py), which also says whether inference attention
folds query-head groups: `amx_for`, `attention_ops`, `confidence_ops` and `folds_query_groups`
answer from it and from what this machine supports. `linear.py` chooses a model's matmul. Its fields start from
$DIFFCODER_CPU_MATMUL ("auto", "amx", "avx512" or "onednn"), $DIFFCODER_CPU_ATTENTION and
$DIFFCODER_CPU_CONFIDENCE ("auto" or "torch").

Each library is built with torch.utils.cpp_extension (g++ and ninja) into `$DIFFCODER_HOME/kernels/`
(or `$DIFFCODER_KERNELS_DIR`) the first time a process needs it (once, under a minute); a machine
where that fails, or whose CPU lacks AMX and AVX-512, keeps oneDNN (or the AVX-512 matmul), SDPA
and torch's ops, with one warning; a CPU with AVX-512 but no AMX runs the AVX-512 library, silently.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..fsutil import cache_root
from ..hardware import cpu_flags, cpu_has_bf16
from .policy import FOLDING, MATMUL_KERNELS, SWITCHES, KernelPolicy, current_policy, using_policy

__all__ = ["KernelPolicy", "current_policy", "using_policy", "MATMUL_KERNELS", "SWITCHES", "FOLDING", "native_ops",
           "amx_for", "attention_ops", "confidence_ops", "folds_query_groups", "amx_unsupported_reason",
           "AMX_MAX_ROWS", "ATTENTION_MAX_ROWS", "avx512_ops", "avx512_for", "avx512_unsupported_reason"]

SOURCES = tuple(Path(__file__).with_name(name) for name in ("amx_linear.cpp", "confidence.cpp", "attention.cpp"))
HEADERS = (Path(__file__).with_name("common.h"),)  # included by the sources: part of the library's hash
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
                 "-fopenmp"]
# The library is compiled for these: loading it on a CPU without them could die on an illegal
# instruction, so they are checked before anything is loaded.
REQUIRED_CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
# Streaming a smol-135m pass's weights (benchmarks/linear_kernels.py --streamed) the AMX kernel is
# well ahead of oneDNN's prepacked kernel up to 32 rows, about even at 64 and behind at 128.
AMX_MAX_ROWS = 64
ATTENTION_MAX_ROWS = 64  # a decode step's folded query rows; a prefill's attention stays on SDPA

AVX512_SOURCES = tuple(Path(__file__).with_name(name) for name in ("avx512_linear.cpp", "confidence.cpp"))
AVX512_COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fopenmp",
                        "-DDIFFCODER_OPS=diffcoder_avx512"]
AVX512_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


def _unsupported_reason(required: tuple[str, ...]) -> str | None:
    import platform

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    flags = cpu_flags()
    missing = [f for f in required if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def amx_unsupported_reason() -> str | None:
    """Why the AMX library cannot run here, or None if it can be tried."""
    return _unsupported_reason(REQUIRED_CPU_FLAGS)


def avx512_unsupported_reason() -> str | None:
    """Why the AVX-512 library cannot run here, or None if it can be tried."""
    return _unsupported_reason(AVX512_CPU_FLAGS)


def library_path(sources: tuple[Path, ...] | None = None, flags: list[str] | None = None,
                 stem: str = "cpu_kernels") -> Path:
    """Where these sources (default: the AMX library's), these flags and this torch build compile to
    (a new file when any changes)."""
    sources = SOURCES if sources is None else sources
    flags = COMPILE_FLAGS if flags is None else flags
    key = hashlib.sha256(b"\0".join([*(src.read_bytes() for src in (*sources, *HEADERS)), " ".join(flags).encode(),
                                     torch.__version__.encode(), sys.version.encode()])).hexdigest()[:16]
    return Path(os.environ.get("DIFFCODER_KERNELS_DIR") or cache_root() / "kernels") / f"{stem}-{key}.so"


def _avx512_library_path() -> Path:
    return library_path(AVX512_SOURCES, AVX512_COMPILE_FLAGS, "avx512_kernels")


def _build(target: Path, sources: tuple[Path, ...], flags: list[str]) -> None:
    """Compile into a private directory, then move the library into place atomically (two
    processes compiling at once both succeed, one file wins)."""
    from torch.utils import cpp_extension

    try:  # the `ninja` wheel's binary, for an environment whose bin directory is not on PATH
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except (ImportError, AttributeError):
        pass  # a ninja on PATH may still do
    target.parent.mkdir(parents=True, exist_ok=True)
    print("diffcoder: compiling the native CPU kernels (once per machine, under a minute)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        name = "diffcoder_" + target.stem.replace("-", "_")
        cpp_extension.load(name=name, sources=[str(src) for src in sources], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], build_directory=tmp, is_python_module=False, verbose=False)
        staged = Path(tmp) / "staged.so"
        shutil.copy2(Path(tmp) / f"{name}.so", staged)
        os.replace(staged, target)


def _register_fakes() -> None:
    """Output shapes for torch.compile, which traces the ops without running them."""

    @torch.library.register_fake("diffcoder_cpu::packed_linear")
    def _(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("diffcoder_cpu::amx_linear")
    def _(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("diffcoder_cpu::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        return q.new_empty(q.shape)

    @torch.library.register_fake("diffcoder_cpu::rope_cache_attention")
    def _(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
          write_idx: torch.Tensor, keys: int, n_heads: int, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        b, t, _, d = heads.shape
        kv = k_cache.shape[1]
        return heads.new_empty((b, kv, n_heads // kv * t, d))

    @torch.library.register_fake("diffcoder_cpu::greedy_confidence")
    def _(logits: torch.Tensor, mask_id: int, masked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return (logits.new_empty(logits.shape[:-1], dtype=torch.float64),
                logits.new_empty(logits.shape[:-1], dtype=torch.long))


# What was decided once per process: "ops" and "avx512" (each library's namespace, or None, once
# loading was tried), "bf16_products" (the CPU's).
_LOADED: dict[str, Any] = {}


def native_ops() -> Any | None:
    """The `torch.ops.diffcoder_cpu` namespace once its library is loaded, or None where the
    native kernels are unavailable (the reason is warned once). A plain dict rather than
    functools.cache, so that torch.compile reads the loaded namespace instead of tracing into the
    loader."""
    if "ops" not in _LOADED:
        _LOADED["ops"] = _load_native_ops()
    return _LOADED["ops"]


def _load_native_ops() -> Any | None:
    reason = unsupported = amx_unsupported_reason()
    if reason is None:
        target = library_path()
        try:
            _load_library(target, SOURCES, COMPILE_FLAGS)
            if torch.ops.diffcoder_cpu.amx_ready():
                _register_fakes()
                return torch.ops.diffcoder_cpu
            reason = "the OS refused AMX state to this process"
        except Exception as exc:  # noqa: BLE001 - any build or load failure means: keep oneDNN
            reason = _build_failure(exc)
    if unsupported is not None and avx512_ops() is not None:
        return None  # a CPU without AMX runs the AVX-512 library as designed: nothing to warn about
    matmul = "the AVX-512 kernel" if avx512_ops() is not None and not _has_bf16_products() else "oneDNN"
    confidences = "the AVX-512 op" if avx512_ops() is not None else "torch's ops"
    warnings.warn(f"diffcoder: the native CPU kernels are not used: {reason}; bf16 matmuls use {matmul}, "
                  f"attention SDPA, confidences {confidences}", RuntimeWarning, stacklevel=3)
    return None


def _load_library(target: Path, sources: tuple[Path, ...], flags: list[str]) -> None:
    if target.exists():
        torch.ops.load_library(str(target))
    else:
        _build(target, sources, flags)  # cpp_extension.load has loaded it into this process


def _build_failure(exc: Exception) -> str:
    lines = str(exc).strip().splitlines() or [""]
    first_error = next((ln for ln in lines if "error:" in ln), lines[-1])
    return f"it did not build or load ({type(exc).__name__}: {first_error.strip()[:300]})"


def avx512_ops() -> Any | None:
    """The `torch.ops.diffcoder_avx512` namespace once the AVX-512 library is loaded, or None where
    this CPU lacks AVX-512 (silently) or the library does not build (warned once)."""
    if "avx512" not in _LOADED:
        _LOADED["avx512"] = _load_avx512_ops()
    return _LOADED["avx512"]


def _load_avx512_ops() -> Any | None:
    if avx512_unsupported_reason() is not None:
        return None
    try:
        _load_library(_avx512_library_path(), AVX512_SOURCES, AVX512_COMPILE_FLAGS)
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: keep oneDNN
        warnings.warn(f"diffcoder: the AVX-512 matmul kernel is not used: {_build_failure(exc)}; bf16 matmuls use "
                      "oneDNN", RuntimeWarning, stacklevel=4)
        return None

    @torch.library.register_fake("diffcoder_avx512::bf16_linear")
    def _(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("diffcoder_avx512::greedy_confidence")
    def _(logits: torch.Tensor, mask_id: int, masked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return (logits.new_empty(logits.shape[:-1], dtype=torch.float64),
                logits.new_empty(logits.shape[:-1], dtype=torch.long))

    return torch.ops.diffcoder_avx512


def _has_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or avx512_bf16), so oneDNN's bf16 matmul is
    not emulated: "auto" then keeps it for what AMX does not take."""
    if "bf16_products" not in _LOADED:  # read once: this is asked on every matmul call
        _LOADED["bf16_products"] = cpu_has_bf16()
    return _LOADED["bf16_products"]


def amx_for(rows: int) -> Any | None:
    """The AMX ops if a bf16 matmul of `rows` input rows should run on them under the current
    policy, else None (the caller uses oneDNN)."""
    kernel = current_policy().matmul
    if kernel in ("onednn", "avx512") or rows > AMX_MAX_ROWS:
        return None
    ops = native_ops()
    if ops is None and kernel == "amx":
        raise RuntimeError("DIFFCODER_CPU_MATMUL=amx, but the AMX kernel is unavailable here (see the warning "
                           "above); use auto or onednn")
    return ops


def avx512_for(rows: int) -> Any | None:
    """The AVX-512 ops if a bf16 matmul of `rows` input rows (any number) should run on them under
    the current policy, else None. "auto" takes them only where bf16 products are not native (no
    AMX, no avx512_bf16), so for calls AMX does not take (`amx_for` is asked first)."""
    kernel = current_policy().matmul
    if kernel in ("onednn", "amx") or (kernel == "auto" and _has_bf16_products()):
        return None
    ops = avx512_ops()
    if ops is None and kernel == "avx512":
        reason = avx512_unsupported_reason() or "it did not build or load (see the warning above)"
        raise RuntimeError(f"DIFFCODER_CPU_MATMUL=avx512, but the AVX-512 kernel is unavailable here: {reason}; "
                           "use auto or onednn")
    return ops


def confidence_ops(logits: torch.Tensor) -> Any | None:
    """The native ops (the AMX library's, else the AVX-512 library's) if the greedy float64
    confidences of these logits should run on them under the current policy, else None (the
    caller uses torch's ops)."""
    if (current_policy().confidence == "torch" or logits.device.type != "cpu"
            or logits.dtype not in (torch.bfloat16, torch.float32)):
        return None
    ops = native_ops()
    return ops if ops is not None else avx512_ops()


def folds_query_groups(device: torch.device) -> bool:
    """Whether inference attention on this device folds query-head groups (GQA) under the current
    policy."""
    return current_policy().folds_query_groups(device.type)


def attention_ops(device: torch.device, dtype: torch.dtype, head_dim: int, rows: int,
                  mask: torch.Tensor | None) -> Any | None:
    """The native ops if a folded decode query of `rows` rows (the query heads of each KV head
    times the tokens) should attend on them under the current policy, else None (the caller uses
    SDPA). The ops read a mask of one row per token (row g * tokens + t reads row t), so a caller
    that takes them does not repeat the mask per query head."""
    if (current_policy().attention == "torch" or device.type != "cpu" or dtype != torch.bfloat16
            or rows > ATTENTION_MAX_ROWS or head_dim % 16 or (mask is not None and mask.dtype != torch.bool)):
        return None
    return native_ops()
