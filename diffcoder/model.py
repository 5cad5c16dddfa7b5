"""A lean Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) with a preallocated KV cache.

Parameter names follow the Hugging Face layout (`model.layers.N.self_attn.q_proj.weight`, ...)
so checkpoints load with a plain state-dict copy. The numerics follow
`transformers.LlamaForCausalLM` (float32 RMSNorm and rotary tables, `rotate_half` RoPE) so
logits agree with it; tests/test_model.py proves it.

Attention takes an explicit boolean mask, so one module serves causal (AR), block-causal
(block diffusion) and the training mask that concatenates noisy and clean copies.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .masks import block_causal_allowed, causal_allowed

MaskSpec = torch.Tensor | str | tuple[str, int] | None


class KVCache:
    """Keys and values of committed tokens, preallocated to `max_len` columns.

    New keys are always written at [length, length + q); only `keep` of them are made part
    of the cache by advancing `length`. Everything past `length` is scratch: the noisy
    block's keys land there and are overwritten by the next call (static shapes, no cat).

    One tensor per layer, not one stacked tensor: a compiled step writes each layer's keys in
    place into its own input, whereas in-place writes into views of one shared tensor made
    inductor copy the whole cache back on every pass.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0
        # Static mode: when set, new keys go to these columns and attention spans all columns.
        self.write_idx: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (rows that finished stop costing compute)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics as transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), then the weight
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies in float32, with the `llama3` / `linear` scaling rules when present."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


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
# oneDNN op itself, and with its own packing (freezing) the compiled smol-135m step still ran plain
# unpacked matmuls (seen in a profile), at about half the prepacked speed. Defined with
# torch.library.Library rather than the custom_op decorator, whose Python wrapper costs a sizeable
# share of a 4-row matmul (a smol-135m pass makes 121 of these calls).
_OPS = torch.library.Library("diffcoder", "DEF")
_OPS.define("prepacked_linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
_OPS.impl("prepacked_linear", _linear_prepacked, "CPU")


@torch.library.register_fake("diffcoder::prepacked_linear", lib=_OPS)
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


class PackedLinear:
    """F.linear with bf16 weights packed once for the CPU kernels (CPU, inference only).

    Decode-sized calls run our AMX kernel (diffcoder/kernels; same products, fp32 sums in another
    order, so within one bf16 rounding of F.linear), larger ones oneDNN's prepacked kernel
    (bit-identical to F.linear); DIFFCODER_CPU_MATMUL=onednn makes every call the latter. With
    autograd enabled it is plain F.linear. Under torch.compile it emits opaque ops that run the
    same kernels: `diffcoder_cpu::packed_linear` (C++) or `diffcoder::prepacked_linear`.
    """

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or w.dtype != torch.bfloat16:
            return F.linear(x, w, b)
        amx = kernels.amx_for(x.numel() // x.shape[-1])  # shapes are static under torch.compile too
        if amx is not None:
            return amx.packed_linear(x, w, b)  # a C++ op: no Python between the graph and the kernel
        if torch.compiler.is_compiling():
            return torch.ops.diffcoder.prepacked_linear(x, w, b)
        return _linear_prepacked(x, w, b)


def decode_matmul_kernel(model: nn.Module) -> str | None:
    """The kernel a prepared model's decode-step matmuls run on: "amx" or "onednn" where they go
    through `PackedLinear` (CPU, bf16), None where they are plain F.linear."""
    if not isinstance(getattr(model, "linear", None), PackedLinear):
        return None
    return "amx" if kernels.amx_for(4) is not None else "onednn"


def _fuse_rows(modules: list[nn.Module], attr: str) -> torch.Tensor:
    """Concatenate the modules' `attr` tensors along dim 0 and rebind each as a view of the result."""
    fused = torch.cat([getattr(m, attr).detach() for m in modules])
    start = 0
    for m in modules:
        n = getattr(m, attr).shape[0]
        setattr(m, attr, nn.Parameter(fused[start:start + n], requires_grad=getattr(m, attr).requires_grad))
        start += n
    return fused


# Per device type: whether inference attention folds each KV head's group of query heads into one
# query (GQA). CPU: SDPA's per-(batch, head) overhead dominates a 4-token decode query; folded, the
# SDPA calls were faster at batch 16 and about even at batch 1, with bit-identical results
# (tests/test_model.py). CUDA: the plain call takes SDPA's math path (GQA with a mask), the folded
# one a fused kernel; `benchmarks/decode.py --fold-query-groups` measures both (RESULTS.md).
FOLD_QUERY_GROUPS: dict[str, bool] = {"cpu": True, "cuda": False}


def folds_query_groups(n_heads: int, n_kv: int, x: torch.Tensor) -> bool:
    """Whether attention folds query-head groups for this input (GQA, inference, FOLD_QUERY_GROUPS).
    Training keeps the plain call."""
    return n_kv != n_heads and FOLD_QUERY_GROUPS.get(x.device.type, False) and not torch.is_grad_enabled()


class AttentionRoute(NamedTuple):
    """How a pass's layers attend, decided once per pass (`DiffCoderLM.attention_route`): `fold`
    the query heads of each KV head into one query (`folds_query_groups`); `native` the native CPU
    ops (diffcoder/kernels) that a folded bf16 decode step attends on, else None (SDPA). For a
    cached step on the native ops, `write_cols` are the cache columns its keys and values go to and
    `keys` how many leading cache columns it attends over, the same for every layer."""
    fold: bool
    native: Any | None
    write_cols: torch.Tensor | None = None
    keys: int = 0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=config.attention_bias)
        self.qkv: torch.Tensor | None = None  # fused [q; k; v] weight for inference (see fuse_projections)
        self.qkv_b: torch.Tensor | None = None
        self.linear = F.linear  # replaced by PackedLinear.__call__ for CPU bf16 decoding

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, layer: int, route: AttentionRoute) -> torch.Tensor:
        b, q, _ = x.shape
        if self.qkv is not None:
            # One matmul for q, k and v, and one rotary application for q and k together.
            heads = self.linear(x, self.qkv, self.qkv_b).view(b, q, -1, self.head_dim)
            if route.native is not None and cache is not None and self.head_dim % 32 == 0:
                # A decode step on a CPU in bf16: rotary, cache writes and attention in one op.
                return self._output(self._native_attention(route, heads, cos, sin, mask, cache, layer))
            heads = heads.transpose(1, 2)
            qk = heads[:, :self.n_heads + self.n_kv]
            qk = qk * cos + rotate_half(qk) * sin
            qs, ks, vs = qk[:, :self.n_heads], qk[:, self.n_heads:], heads[:, self.n_heads + self.n_kv:]
        else:
            qs = self.q_proj(x).view(b, q, self.n_heads, self.head_dim).transpose(1, 2)
            ks = self.k_proj(x).view(b, q, self.n_kv, self.head_dim).transpose(1, 2)
            vs = self.v_proj(x).view(b, q, self.n_kv, self.head_dim).transpose(1, 2)
            qs = qs * cos + rotate_half(qs) * sin
            ks = ks * cos + rotate_half(ks) * sin
        if cache is not None and cache.write_idx is not None:
            # Static shapes (CUDA graphs): write at the given columns, attend over every column
            # of the cache; the mask hides what is not (yet) part of the sequence.
            cache.k[layer].index_copy_(2, cache.write_idx, ks)
            cache.v[layer].index_copy_(2, cache.write_idx, vs)
            ks, vs = cache.k[layer], cache.v[layer]
        elif cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + q] = ks
            cache.v[layer][:, :, start:start + q] = vs
            ks = cache.k[layer][:, :, :start + q]
            vs = cache.v[layer][:, :, :start + q]
        if route.fold:
            # The query heads that share a KV head become rows of one query (for SDPA the mask was
            # repeated to match, see hidden_states): a few larger SDPA calls instead of many tiny
            # ones. Each row's softmax sees the same keys in the same order, so SDPA's result is
            # bit-identical; a bf16 decode step on a CPU takes our native op instead (kernels).
            folded = qs.reshape(b, self.n_kv, -1, self.head_dim)
            if route.native is not None:  # diffcoder/kernels/attention.cpp
                out = route.native.decode_attention(folded, ks, vs, mask, self.head_dim ** -0.5)
            else:
                out = F.scaled_dot_product_attention(folded, ks, vs, attn_mask=mask)
            out = out.reshape(b, self.n_heads, q, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self._output(out)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection of the heads' results [batch, heads, tokens, dim]."""
        b, _, q, _ = out.shape
        out = out.transpose(1, 2).reshape(b, q, self.n_heads * self.head_dim)
        if self.qkv is None:  # unfused (training): through the module, so an adapter wrapping it applies
            return self.o_proj(out)
        return self.linear(out, self.o_proj.weight, self.o_proj.bias)

    def _native_attention(self, route: AttentionRoute, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          mask: torch.Tensor | None, cache: KVCache, layer: int) -> torch.Tensor:
        """[batch, heads, tokens, dim]: the step's keys and values written into the cache at the
        route's columns and its queries attended, in one op."""
        b, q = heads.shape[:2]
        out = route.native.rope_cache_attention(heads, cos, sin, cache.k[layer], cache.v[layer], route.write_cols,
                                                route.keys, self.n_heads, mask, self.head_dim ** -0.5)
        return out.reshape(b, self.n_heads, q, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.gate_up: torch.Tensor | None = None  # fused [gate; up] weight for inference
        self.linear = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.linear(x, self.gate_up, None).chunk(2, dim=-1)
            return self.linear(F.silu(gate) * up, self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, route):  # noqa: ANN001, ANN201 (hot path)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, route)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DiffCoderLM(nn.Module):
    """Llama-family LM. `forward` returns logits; see docs/architecture.md for the contract."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.tokenizer = None  # set by diffcoder.load when the checkpoint has one
        self.mask_id: int | None = config.mask_token_id
        self.generation_defaults: dict = {}
        self.gradient_checkpointing = False
        self._fused = False
        self.linear = F.linear

    # --------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (the transformers/peft name for it)."""
        return self.model.embed_tokens

    def parameter_bytes(self) -> int:
        """Bytes of the parameters as `parameters()` lists them (tied weights once)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "DiffCoderLM":
        """Deterministic random initialisation (normal(0, std), norms at 1)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def prepare_for_decoding(self, max_packed_bytes: int = 4 << 30) -> "DiffCoderLM":
        """Fuse projections; on a CPU, load the native kernels (diffcoder/kernels), and in bf16 use
        packed weights (`PackedLinear`: no per-call weight reorder, and the AMX kernel for
        decode-sized calls). Packing keeps a second copy of
        the weights (a third once a prefill also packs them for oneDNN), so it is skipped when
        the weights exceed `max_packed_bytes`."""
        self.fuse_projections()
        if self.device.type == "cpu":
            kernels.native_ops()  # build or load the native kernels now, not inside a compiled step's trace
        if (self.device.type == "cpu" and self.dtype == torch.bfloat16 and self.parameter_bytes() <= max_packed_bytes
                and torch.backends.mkldnn.is_available() and self._fused
                and not isinstance(self.linear, PackedLinear)):
            packed = PackedLinear()
            for module in [self, *self.model.layers.modules()]:
                if hasattr(module, "linear"):
                    module.linear = packed
        return self

    def fuse_projections(self) -> "DiffCoderLM":
        """Fuse q/k/v and gate/up into single matmuls for decoding (fewer, larger kernels).

        The separate parameters become views of the fused tensors, so nothing is stored twice
        and in-place weight updates stay visible to both. Call after moving the model to its
        device; idempotent. Training does not need it (autograd sees the original modules).
        """
        if self._fused or self.config.mlp_bias:
            return self
        with torch.no_grad():
            for layer in self.model.layers:
                att, mlp = layer.self_attn, layer.mlp
                projs = [att.q_proj, att.k_proj, att.v_proj]
                att.qkv = _fuse_rows(projs, "weight")
                if projs[0].bias is not None:
                    att.qkv_b = _fuse_rows(projs, "bias")
                mlp.gate_up = _fuse_rows([mlp.gate_proj, mlp.up_proj], "weight")
        self._fused = True
        return self

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.dtype)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dev = positions.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.config, dev)
        with torch.autocast(device_type=dev.type, enabled=False):
            freqs = positions.float().unsqueeze(-1) * self._inv_freq[dev]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def build_mask(self, spec: MaskSpec, positions: torch.Tensor, key_len: int) -> torch.Tensor | None:
        """Turn a mask spec into a [b|1, 1, q, k] boolean tensor (None = full attention)."""
        if isinstance(spec, torch.Tensor):
            if spec.dtype != torch.bool:
                raise ValueError("attn_mask must be a boolean tensor (True = may attend)")
            return spec.unsqueeze(1) if spec.dim() == 3 else spec
        q_len = positions.shape[-1]
        k_pos = torch.arange(key_len, device=positions.device)
        if key_len != q_len or not torch.equal(positions[0], k_pos):
            k_pos = torch.cat([torch.arange(key_len - q_len, device=positions.device), positions[0]])
        q_pos = positions[0]
        if spec is None or spec == "causal":
            m = causal_allowed(q_pos, k_pos)
        elif spec == "full":
            return None  # SDPA without a mask: every query sees every key (and takes the fast path)
        elif isinstance(spec, tuple) and spec[0] == "block_causal":
            m = block_causal_allowed(q_pos, k_pos, int(spec[1]))
        else:
            raise ValueError(f"unknown attention mask spec {spec!r}: use 'causal', 'full', "
                             "('block_causal', B) or a boolean tensor")
        return m[None, None]

    # --------------------------------------------------------------- forward
    def attention_route(self, x: torch.Tensor, tokens: int, mask: torch.Tensor | None) -> AttentionRoute:
        """How every layer of a pass over `tokens` tokens attends (decided once per pass)."""
        cfg = self.config
        fold = folds_query_groups(cfg.num_attention_heads, cfg.num_key_value_heads, x)
        rows = cfg.num_attention_heads // cfg.num_key_value_heads * tokens
        return AttentionRoute(fold, kernels.attention_ops(x.device, x.dtype, cfg.head_dim, rows, mask) if fold else None)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                      attn_mask: MaskSpec = None, cache: KVCache | None = None,
                      keep: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, q = input_ids.shape
        static = cache is not None and cache.write_idx is not None
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + q, device=input_ids.device).expand(b, q)
        if cache is not None and not static and start + q > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} cached + {q} new > {cache.max_len} columns")
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope if rope is not None else self.rotary(positions, x.dtype)
        mask = attn_mask.unsqueeze(1) if static else self.build_mask(attn_mask, positions, start + q)
        route = self.attention_route(x, q, mask)
        if route.native is not None and cache is not None:
            # Static passes write at the runner's columns and attend over the whole cache; dynamic
            # ones write after the cached columns and attend up to their own.
            route = route._replace(**(dict(write_cols=cache.write_idx, keys=cache.max_len) if static else
                                       dict(write_cols=torch.arange(start, start + q, device=x.device), keys=start + q)))
        if route.fold and route.native is None and mask is not None and mask.shape[-2] > 1:
            # SDPA on a folded query needs a mask row per query row; the native ops do without.
            mask = mask.repeat(1, 1, self.config.num_attention_heads // self.config.num_key_value_heads, 1)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, i, route, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, route)
        if cache is not None and not static:
            cache.length = start + (q if keep is None else keep)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                attn_mask: MaskSpec = None, cache: KVCache | None = None, keep: int | None = None,
                logits_index: slice | torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [b, q', vocab]. `keep`: how many of the new tokens (leading ones) stay in the
        cache (default all). `logits_index`: compute the vocabulary projection only there.
        `rope`: precomputed (cos, sin) for `positions`, as `rotary()` returns them."""
        h = self.hidden_states(input_ids, positions, attn_mask=attn_mask, cache=cache, keep=keep, rope=rope)
        if logits_index is not None:
            h = h[:, logits_index]
        return self.linear(h, self.lm_head.weight, None)

    # ------------------------------------------------ release-style drop-in
    def generate(self, input_ids: torch.Tensor, steps: int = 128, gen_length: int = 128, block_length: int = 4,
                 temperature: float = 0.0, remasking: str = "low_confidence", tokenizer=None,  # noqa: ANN001
                 mask_id: int | None = None, threshold: float | None = None, shift: bool = False,
                 eos_id: int | None = None, seed: int | None = None, **_: object) -> torch.Tensor:
        """The release's `model.generate(input_ids, ...)`: returns prompt + generated ids, shaped
        like its output (cut at the end of the block holding the first EOS, EOS-filled after it)."""
        from .decode import release_style_output

        return release_style_output(self, input_ids, steps=steps, gen_length=gen_length,
                                    block_length=block_length, temperature=temperature, remasking=remasking,
                                    mask_id=mask_id, threshold=threshold, shift=shift, eos_id=eos_id, seed=seed)
