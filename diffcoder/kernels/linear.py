"""The matmul a model's passes use (`decode_linear`): F.linear, or on a CPU in bf16
`packed_linear`, which runs the AMX kernel (amx_linear.cpp) or oneDNN's prepacked one."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import amx_for

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
    one bf16 rounding of F.linear), larger ones oneDNN's prepacked kernel (bit-identical to
    F.linear); the policy's matmul="onednn" makes every call the latter (`amx_for`). With autograd
    enabled it is plain F.linear. Under torch.compile it emits opaque ops that run the same
    kernels: `diffcoder_cpu::packed_linear` (C++) or `diffcoder::prepacked_linear`.
    """
    if torch.is_grad_enabled() or x.device.type != "cpu" or w.dtype != torch.bfloat16:
        return F.linear(x, w, b)
    amx = amx_for(x.numel() // x.shape[-1])  # shapes are static under torch.compile too
    if amx is not None:
        return amx.packed_linear(x, w, b)  # a C++ op: no Python between the graph and the kernel
    if torch.compiler.is_compiling():
        return torch.ops.diffcoder.prepacked_linear(x, w, b)
    return _linear_prepacked(x, w, b)


def decode_linear(device: torch.device, dtype: torch.dtype, weight_bytes: int, max_packed_bytes: int) -> Linear:
    """The matmul for a decoding model's fused projections: `packed_linear` on a CPU in bf16 with
    oneDNN (no per-call weight reorder; the AMX kernel for decode-sized calls), else F.linear.
    Packing keeps a second copy of the weights (a third once a prefill also packs them for
    oneDNN), so weights over `max_packed_bytes` stay unpacked."""
    if (device.type == "cpu" and dtype == torch.bfloat16 and weight_bytes <= max_packed_bytes
            and torch.backends.mkldnn.is_available()):
        return packed_linear
    return F.linear


def decode_matmul_kernel(linear: Linear) -> str | None:
    """The kernel a decode step's matmuls run on through `linear` under the current policy:
    "amx" or "onednn" for `packed_linear`, None for plain F.linear."""
    if linear is not packed_linear:
        return None
    return "amx" if amx_for(4) is not None else "onednn"
