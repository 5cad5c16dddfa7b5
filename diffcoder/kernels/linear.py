"""The matmul a model's passes use (`decode_linear`): F.linear, or on a CPU in bf16
`packed_linear`, which runs the AMX kernel (amx_linear.cpp), the AVX-512 one (avx512_linear.cpp)
or oneDNN's prepacked one."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..hardware import pick_dtype, runs_bf16
from . import amx_for, avx512_for

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

_PACKED_WEIGHTS = torch.utils.weak.WeakIdKeyDictionary()  # weight -> (version, oneDNN-blocked copy)


def _linear_prepacked(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear through a oneDNN-blocked copy of `w`, made once per weight and remade when the
    weight was modified in place (its version counter moved), so updates are never served stale."""
    version = -1 if w.is_inference() else w._version  # inference tensors have no version counter
    entry = _PACKED_WEIGHTS.get(w)
    if entry is None or entry[0] != version:
        entry = _PACKED_WEIGHTS[w] = (version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 4))
    return torch.ops.mkldnn._linear_pointwise(x, entry[1], b, "none", [], "")


# `_linear_prepacked` as an op that torch.compile keeps opaque: inductor cannot lower the prepacked
# oneDNN op itself, and with its own packing (freezing) a compiled step runs plain unpacked
# matmuls, far slower than the prepacked kernel; so compiled steps run without freezing (and see
# in-place weight updates). Defined with torch.library.Library rather than the custom_op
# decorator, whose Python wrapper costs a sizeable share of a 4-row matmul (a smol-135m pass makes
# 121 of these calls).
_OPS = torch.library.Library("diffcoder", "DEF")
_OPS.define("prepacked_linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
_OPS.impl("prepacked_linear", _linear_prepacked, "CPU")


@torch.library.register_fake("diffcoder::prepacked_linear", lib=_OPS)
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear with bf16 weights packed once for the CPU kernels (CPU, inference only).

    Decode-sized calls run the AMX kernel (same products, fp32 sums in another order, so within
    one bf16 rounding of F.linear); on a CPU without native bf16 products every call runs the
    AVX-512 kernel (the same, and unpacked); the rest oneDNN's prepacked kernel (bit-identical to
    F.linear); the policy's matmul="onednn" makes every call the latter (`amx_for`, `avx512_for`).
    With autograd enabled it is plain F.linear. Under torch.compile it emits opaque ops that run
    the same kernels: `diffcoder_cpu::packed_linear`, `diffcoder_avx512::bf16_linear` (C++) or
    `diffcoder::prepacked_linear`.
    """
    if torch.is_grad_enabled() or x.device.type != "cpu" or w.dtype != torch.bfloat16:
        return F.linear(x, w, b)
    rows = x.numel() // x.shape[-1]  # shapes are static under torch.compile too
    amx = amx_for(rows)
    if amx is not None:
        return amx.packed_linear(x, w, b)  # a C++ op: no Python between the graph and the kernel
    avx512 = avx512_for(rows)
    if avx512 is not None:
        return avx512.bf16_linear(x, w, b)
    if torch.compiler.is_compiling():
        return torch.ops.diffcoder.prepacked_linear(x, w, b)
    return _linear_prepacked(x, w, b)


def decode_linear(device: torch.device, dtype: torch.dtype, weight_bytes: int, max_packed_bytes: int) -> Linear:
    """The matmul for a decoding model's fused projections: `packed_linear` on a CPU in bf16 with
    oneDNN (no per-call weight reorder; the AMX kernel for decode-sized calls) or the AVX-512
    kernel, else F.linear. Packing keeps a second copy of the weights (a third once a prefill also
    packs them for oneDNN), so weights over `max_packed_bytes` stay unpacked, unless the AVX-512
    kernel, which reads them in place, takes every call."""
    if (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and (weight_bytes <= max_packed_bytes or avx512_for(4) is not None)):
        return packed_linear
    return F.linear


def decode_matmul_kernel(linear: Linear) -> str | None:
    """The kernel a decode step's matmuls run on through `linear` under the current policy:
    "amx", "avx512" or "onednn" for `packed_linear`, None for plain F.linear."""
    if linear is not packed_linear:
        return None
    if amx_for(4) is not None:
        return "amx"
    return "avx512" if avx512_for(4) is not None else "onednn"


def decode_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """`hardware.pick_dtype` for decoding: "auto" is also bfloat16 on a CPU whose bf16 matmuls run
    on the AVX-512 kernel (bf16 weights widened in registers: half float32's bytes at its FMA rate,
    where oneDNN would emulate bf16 products at a loss)."""
    if name == "auto" and torch.device(device).type == "cpu" and not runs_bf16(device) and avx512_for(4) is not None:
        return torch.bfloat16
    return pick_dtype(name, device)
