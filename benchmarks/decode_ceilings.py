"""The ceilings a decode pass is measured against on this machine: the read bandwidth, the bytes a
pass must read, a pass of nothing but its matmuls, and a pass that only reads each matmul weight once.
"""
from __future__ import annotations

from typing import Any

import torch

from diffcoder.kernels import native_ops
from diffcoder.model import DiffCoderLM
from measure import best_seconds  # benchmarks/measure.py (on sys.path: this folder)


def measure_bandwidth(device: torch.device, nbytes: int) -> dict[str, float]:
    """Best-of-5 read bandwidth in bytes/s of each way we have to read a buffer of `nbytes` once:
    a float32 sum, and on a CPU with AMX our matmul kernel streaming the same bytes as one weight
    (with one input row; its software prefetching reads faster than the sum on this project's
    VM). The limit a benchmark divides by is the fastest of them."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    rates = {"float32 sum": nbytes / best_seconds(buf.sum, device, repeats=5)}
    if device.type == "cpu" and (ops := native_ops()) is not None:
        k_pairs = 512  # the buffer read as AMX panels of 16 columns x 1024 features
        panels = buf.view(torch.bfloat16).view(-1, k_pairs, 16, 2)
        x = torch.zeros(1, 2 * k_pairs, dtype=torch.bfloat16)
        with torch.inference_mode():
            rates["AMX kernel"] = nbytes / best_seconds(
                lambda: ops.amx_linear(x, panels, panels.shape[0] * 16, None), device, repeats=5, warmup=1)
    return rates


def weight_bytes_per_pass(model: DiffCoderLM) -> int:
    """Bytes every pass must read: all weights except an untied input embedding (only B rows of it)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def decode_matmuls(model: DiffCoderLM) -> list[tuple[Any, torch.Tensor]]:
    """(linear function, weight) of every matmul in one decode pass, in the model's order and with
    the kernels it uses (fused q/k/v and gate/up, prepacked on a CPU in bf16)."""
    mms = []
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        qkv = [att.qkv] if att.qkv is not None else [att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]
        gate_up = [mlp.gate_up] if mlp.gate_up is not None else [mlp.gate_proj.weight, mlp.up_proj.weight]
        mms += [(model.linear, w) for w in (*qkv, att.o_proj.weight, *gate_up, mlp.down_proj.weight)]
    return [*mms, (model.linear, model.lm_head.weight)]


def matmul_only_passes_per_s(model: DiffCoderLM, rows: int, repeats: int = 5, head_rows: int | None = None) -> float:
    """Passes/s of a pass that were nothing but its matmuls (same kernels, same weights streamed
    once each, `rows` input rows, `head_rows` of them (default all) through the vocabulary
    projection): the ceiling for the whole pass on this machine, so a bandwidth shortfall splits
    into what the matmul kernels leave and what the rest of the pass adds."""
    device, mms = model.device, decode_matmuls(model)
    inputs = {w.shape[1]: torch.randn(1, rows, w.shape[1], device=device, dtype=model.dtype) for _, w in mms}
    head_x = inputs[model.lm_head.weight.shape[1]][:, :head_rows or rows]

    def sweep() -> None:
        for fn, w in mms[:-1]:
            fn(inputs[w.shape[1]], w, None)
        fn, w = mms[-1]
        fn(head_x, w, None)

    with torch.inference_mode():  # the warm-up sweep also packs weights not packed yet
        return 1.0 / best_seconds(sweep, device, repeats, warmup=1)


def matmul_bound_tokens_per_s(run: dict[str, Any], step_rate: float, commit_rate: float, blocks: int) -> float:
    """Tokens/s of `run` had each of its passes taken only its matmuls' time: per block, one fused
    commit pass (`commit_rate` passes/s; the first block's pass with the prefill counts as one)
    and the rest block steps (`step_rate`)."""
    per_block = run["nfe"] / blocks
    seconds = blocks * ((per_block - 1) / step_rate + 1 / commit_rate)
    return run["tokens"] / seconds


def _as_float32_bytes(flat: torch.Tensor) -> torch.Tensor:
    """The same bytes as float32 where they can be reinterpreted so (the fastest sum), else as they are."""
    if flat.element_size() == 2 and flat.numel() % 2 == 0:
        try:
            return flat.view(torch.float32)
        except RuntimeError:  # storage offset not aligned to 4 bytes
            pass
    return flat


def weight_read_passes_per_s(model: DiffCoderLM, repeats: int = 5) -> float:
    """Passes/s if a pass did nothing but read each of its matmul weights once, one op per weight
    (a float32 sum over the weight's bytes): the ceiling for any pass made of one kernel per
    matmul on this machine, below the single-buffer bandwidth by the cost of many separate,
    smaller reads."""
    views = [_as_float32_bytes(w.detach().reshape(-1)) for _, w in decode_matmuls(model)]

    def sweep() -> None:
        for v in views:
            v.sum()

    return 1.0 / best_seconds(sweep, model.device, repeats, warmup=1)
