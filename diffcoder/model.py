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
from .kernels.linear import Linear, decode_linear
from .masks import block_causal_allowed, causal_allowed

MaskSpec = torch.Tensor | str | tuple[str, int] | None


class CacheWrite(NamedTuple):
    """Where one pass puts its keys and values in a `KVCache`: at columns `cols` (one per new
    token), attention then reading the first `keys` columns. `KVCache.update` writes there, and
    so does the native CPU op that fuses the write into a decode step's attention."""
    cols: torch.Tensor
    keys: int


class KVCache:
    """Keys and values, preallocated to `max_len` columns, of which the first `length` are committed.

    A pass writes its keys through `update`, at the columns `columns_for` gives: by default the
    ones after the committed columns, attention reading up to its own; a static-shape step names
    fixed columns and attends over every column, its mask hiding what is not (yet) part of the
    sequence (static shapes: no cat, no growing views). Written columns past `length` are
    scratch (the noisy block's keys) that the next pass overwrites.

    One tensor per layer, not one stacked tensor: a compiled step writes each layer's keys in
    place into its own input, whereas in-place writes into views of one shared tensor make
    inductor copy the whole cache back on every pass.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def columns_for(self, tokens: int, device: torch.device, cols: torch.Tensor | None = None) -> CacheWrite:
        """Where a pass of `tokens` new tokens writes: at `cols` with attention over every column,
        or (None) right after the committed columns with attention up to its own."""
        if cols is not None:
            return CacheWrite(cols, self.max_len)
        start = self.length
        if start + tokens > self.max_len:
            raise ValueError(f"KV cache overflow: {start} cached + {tokens} new > {self.max_len} columns")
        return CacheWrite(torch.arange(start, start + tokens, device=device), start + tokens)

    def update(self, layer: int, write: CacheWrite, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys and values [batch, kv_heads, tokens, dim] at `write.cols`;
        returns the keys and values its attention reads."""
        self.k[layer].index_copy_(2, write.cols, k)
        self.v[layer].index_copy_(2, write.cols, v)
        return self.k[layer][:, :, :write.keys], self.v[layer][:, :, :write.keys]

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


def _fuse_rows(modules: list[nn.Module], attr: str) -> torch.Tensor:
    """Concatenate the modules' `attr` tensors along dim 0 and rebind each as a view of the result."""
    fused = torch.cat([getattr(m, attr).detach() for m in modules])
    start = 0
    for m in modules:
        n = getattr(m, attr).shape[0]
        setattr(m, attr, nn.Parameter(fused[start:start + n], requires_grad=getattr(m, attr).requires_grad))
        start += n
    return fused


def folds_query_groups(n_heads: int, n_kv: int, x: torch.Tensor) -> bool:
    """Whether attention folds query-head groups for this input: GQA, inference, and the kernel
    policy folding on its device (`kernels.folds_query_groups`). Training keeps the plain call."""
    return n_kv != n_heads and kernels.folds_query_groups(x.device) and not torch.is_grad_enabled()


class PassPlan(NamedTuple):
    """What every layer of one pass uses, decided once per pass (`DiffCoderLM.plan_pass`): `linear`
    the matmul of the fused projections (`DiffCoderLM.linear`, chosen by `prepare_for_decoding`);
    `fold` the query heads of each KV head into one query (`folds_query_groups`); `native` the
    native CPU ops (diffcoder/kernels) that a folded bf16 decode step attends on, else None (SDPA);
    `write` where a cached pass's keys and values go (the same for every layer; None: no cache)."""
    linear: Linear
    fold: bool
    native: Any | None
    write: CacheWrite | None = None


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, layer: int, plan: PassPlan) -> torch.Tensor:
        b, q, _ = x.shape
        if self.qkv is not None:
            # One matmul for q, k and v, and one rotary application for q and k together.
            heads = plan.linear(x, self.qkv, self.qkv_b).view(b, q, -1, self.head_dim)
            if plan.native is not None and cache is not None and self.head_dim % 32 == 0:
                # A decode step on a CPU in bf16: rotary, cache write and attention in one op.
                return self._output(self._native_attention(plan, heads, cos, sin, mask, cache, layer), plan.linear)
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
        if cache is not None:
            ks, vs = cache.update(layer, plan.write, ks, vs)
        if plan.fold:
            # The query heads that share a KV head become rows of one query (for SDPA the mask was
            # repeated to match, see hidden_states): a few larger SDPA calls instead of many tiny
            # ones. Each row's softmax sees the same keys in the same order, so SDPA's result is
            # bit-identical; a bf16 decode step on a CPU takes our native op instead (kernels).
            folded = qs.reshape(b, self.n_kv, -1, self.head_dim)
            if plan.native is not None:  # diffcoder/kernels/attention.cpp
                out = plan.native.decode_attention(folded, ks, vs, mask, self.head_dim ** -0.5)
            else:
                out = F.scaled_dot_product_attention(folded, ks, vs, attn_mask=mask)
            out = out.reshape(b, self.n_heads, q, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self._output(out, plan.linear)

    def _output(self, out: torch.Tensor, linear: Linear) -> torch.Tensor:
        """The output projection of the heads' results [batch, heads, tokens, dim]."""
        b, _, q, _ = out.shape
        out = out.transpose(1, 2).reshape(b, q, self.n_heads * self.head_dim)
        if self.qkv is None:  # unfused (training): through the module, so an adapter wrapping it applies
            return self.o_proj(out)
        return linear(out, self.o_proj.weight, self.o_proj.bias)

    def _native_attention(self, plan: PassPlan, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          mask: torch.Tensor | None, cache: KVCache, layer: int) -> torch.Tensor:
        """[batch, heads, tokens, dim]: the step's keys and values written into the cache where
        `plan.write` says (as `KVCache.update` writes them) and its queries attended, in one op."""
        b, q = heads.shape[:2]
        out = plan.native.rope_cache_attention(heads, cos, sin, cache.k[layer], cache.v[layer], plan.write.cols,
                                               plan.write.keys, self.n_heads, mask, self.head_dim ** -0.5)
        return out.reshape(b, self.n_heads, q, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.gate_up: torch.Tensor | None = None  # fused [gate; up] weight for inference

    def forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = linear(x, self.gate_up, None).chunk(2, dim=-1)
            return linear(F.silu(gate) * up, self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, plan):  # noqa: ANN001, ANN201 (hot path)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, plan)
        return x + self.mlp(self.post_attention_layernorm(x), plan.linear)


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
        self.source = None  # set by diffcoder.load: the checkpoint directory it read
        self.mask_id: int | None = config.mask_token_id
        self.generation_defaults: dict = {}
        self.gradient_checkpointing = False
        self._fused = False
        # The matmul of the fused projections and of the vocabulary projection; every layer of a
        # pass gets it through the pass's plan. prepare_for_decoding chooses it (kernels.linear).
        self.linear: Linear = F.linear

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
        """Fuse projections and choose their matmul (`kernels.linear.decode_linear`: packed bf16
        weights on a CPU unless they exceed `max_packed_bytes`); on a CPU, load the native kernels
        now rather than inside a compiled step's trace. Idempotent."""
        self.fuse_projections()
        if self.device.type == "cpu":
            kernels.native_ops()
        if self._fused:
            self.linear = decode_linear(self.device, self.dtype, self.parameter_bytes(), max_packed_bytes)
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
    def plan_pass(self, x: torch.Tensor, tokens: int, mask: torch.Tensor | None,
                  write: CacheWrite | None = None) -> PassPlan:
        """What every layer of a pass over `tokens` tokens uses (decided once per pass)."""
        cfg = self.config
        fold = folds_query_groups(cfg.num_attention_heads, cfg.num_key_value_heads, x)
        rows = cfg.num_attention_heads // cfg.num_key_value_heads * tokens
        native = kernels.attention_ops(x.device, x.dtype, cfg.head_dim, rows, mask) if fold else None
        return PassPlan(self.linear, fold, native, write)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                      attn_mask: MaskSpec = None, cache: KVCache | None = None, cache_cols: torch.Tensor | None = None,
                      keep: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, q = input_ids.shape
        write = cache.columns_for(q, input_ids.device, cache_cols) if cache is not None else None
        if positions is None:
            positions = (write.cols if write is not None else torch.arange(q, device=input_ids.device)).expand(b, q)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope if rope is not None else self.rotary(positions, x.dtype)
        mask = self.build_mask(attn_mask, positions, q if write is None else write.keys)
        plan = self.plan_pass(x, q, mask, write)
        if plan.fold and plan.native is None and mask is not None and mask.shape[-2] > 1:
            # SDPA on a folded query needs a mask row per query row; the native ops do without.
            mask = mask.repeat(1, 1, self.config.num_attention_heads // self.config.num_key_value_heads, 1)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, i, plan, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, plan)
        if cache is not None and cache_cols is None:
            cache.length += q if keep is None else keep
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                attn_mask: MaskSpec = None, cache: KVCache | None = None, cache_cols: torch.Tensor | None = None,
                keep: int | None = None, logits_index: slice | torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [b, q', vocab]. With a `cache`, the new keys and values go to the columns after
        its committed ones, and `keep` of them (the leading ones; default all) become committed;
        with `cache_cols` they go to those columns instead, attention spans every column (the mask
        covers them all) and the caller sets `cache.length`. `logits_index`: compute the vocabulary
        projection only there. `rope`: precomputed (cos, sin) for `positions`, as `rotary()`
        returns them."""
        h = self.hidden_states(input_ids, positions, attn_mask=attn_mask, cache=cache, cache_cols=cache_cols,
                               keep=keep, rope=rope)
        if logits_index is not None:
            h = h[:, logits_index]
        return self.linear(h, self.lm_head.weight, None)
