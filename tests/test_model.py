"""Our Llama-family module against transformers, and cached against uncached logits."""
from __future__ import annotations

import pytest
import torch

from diffcoder.masks import block_causal_mask, decode_mask
from helpers import hf_twin, llama_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("kw", [
    {},
    {"num_key_value_heads": 4},
    {"num_key_value_heads": 1, "tie_word_embeddings": True},
    {"rope_scaling": LLAMA3, "rope_theta": 500000.0},
    {"attention_bias": True},
    {"head_dim": 32},
])
@pytest.mark.parametrize("mask", ["causal", 1, 4, 8])
def test_logits_match_transformers(kw, mask):
    model = llama_model(**kw)
    if kw.get("attention_bias"):
        with torch.no_grad():  # biases start at zero: make them matter
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
    hf = hf_twin(model, torch.float32)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if mask == "causal":
            ours, theirs = model(ids), hf(ids).logits
        else:
            ours = model(ids, attn_mask=("block_causal", mask))
            theirs = hf(ids, attention_mask=block_causal_mask(23, mask)[None, None]).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_block_causal_mask_rule():
    m = block_causal_mask(8, 4)
    for q in range(8):
        for k in range(8):
            assert bool(m[q, k]) == (k // 4 <= q // 4)
    assert torch.equal(block_causal_mask(6, 1), torch.ones(6, 6, dtype=torch.bool).tril())


def test_cached_equals_uncached_blockwise():
    """Prefill + block-by-block with the KV cache gives the same logits as one full pass."""
    model = llama_model(seed=3).double()
    B, T = 4, 22
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, attn_mask=("block_causal", B))
        cache = model.new_cache(1, 32)
        pieces, start = [], 0
        cols = torch.arange(32)
        valid = torch.ones(1, 32, dtype=torch.bool)
        while start < T:
            end = min(start + B, T)
            mask = decode_mask(cols[start:end], cols[:end], valid[:, :end], B)
            pieces.append(model(ids[:, start:end], torch.arange(start, end)[None], attn_mask=mask, cache=cache))
            start = end
    assert cache.length == T
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-10


def test_uncommitted_keys_are_not_kept():
    """keep=0 leaves the cache length unchanged: the noisy block's keys are scratch."""
    model = llama_model(seed=4).double()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(ids[:, :8], attn_mask=("block_causal", 4), cache=cache)
        a = model(ids[:, 8:12], attn_mask=("block_causal", 4), cache=cache, keep=0)
        assert cache.length == 8
        noisy = ids[:, 8:12].clone()
        noisy[0, 0] = (noisy[0, 0] + 1) % 97
        model(noisy, attn_mask=("block_causal", 4), cache=cache, keep=0)
        b = model(ids[:, 8:12], attn_mask=("block_causal", 4), cache=cache, keep=0)
    assert torch.equal(a, b)


def test_static_cache_columns_give_the_logits_and_keys_of_the_dynamic_write():
    """A static-shape step (`cache_cols`: fixed columns, attention over every column, the mask
    hiding the unused ones) writes the same keys and gives the same logits as the dynamic write
    after the committed columns; it leaves `length` to the caller. Both go through KVCache.update."""
    model = llama_model(seed=10).double()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(8))
    cols = torch.arange(16)
    with torch.no_grad():
        dynamic, static = model.new_cache(2, 16), model.new_cache(2, 16)
        for cache in (dynamic, static):
            model(ids[:, :8], attn_mask=("block_causal", 4), cache=cache)
        a = model(ids[:, 8:], attn_mask=("block_causal", 4), cache=dynamic, keep=0)
        mask = decode_mask(cols[8:12], cols, torch.ones(2, 16, dtype=torch.bool) & (cols < 12), 4)
        b = model(ids[:, 8:], torch.arange(8, 12).expand(2, 4), attn_mask=mask, cache=static,
                  cache_cols=torch.arange(8, 12))
    assert dynamic.length == static.length == 8
    assert (a - b).abs().max().item() < 1e-10
    for layer in range(2):
        assert torch.equal(dynamic.k[layer], static.k[layer]) and torch.equal(dynamic.v[layer], static.v[layer])


def test_kv_cache_update_writes_the_columns_and_returns_what_attention_reads():
    model = llama_model()
    cache = model.new_cache(1, 8)
    cache.length = 3
    write = cache.columns_for(2, torch.device("cpu"))
    assert write.cols.tolist() == [3, 4] and write.keys == 5
    k, v = torch.ones(1, 2, 2, 16), torch.full((1, 2, 2, 16), 2.0)
    keys, values = cache.update(1, write, k, v)
    assert keys.shape == values.shape == (1, 2, 5, 16)
    assert torch.equal(keys[:, :, 3:], k) and torch.equal(values[:, :, 3:], v) and not keys[:, :, :3].any()
    fixed = cache.columns_for(2, torch.device("cpu"), torch.tensor([6, 7]))
    assert fixed.keys == 8 and cache.update(0, fixed, k, v)[0].shape[2] == 8
    cache.length = 7
    with pytest.raises(ValueError, match="KV cache overflow: 7 cached \\+ 2 new > 8 columns"):
        cache.columns_for(2, torch.device("cpu"))


def test_left_padding_is_invisible():
    """A row left-padded by a multiple of B gives the same logits as the row alone."""
    model = llama_model(seed=6).double()
    B = 4
    row = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(7))
    pad = 8
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), row], 1)
    cols = torch.arange(pad + 10)
    pos = (cols - pad).clamp_min(0)[None]
    valid = (cols >= pad)[None]
    with torch.no_grad():
        alone = model(row, attn_mask=("block_causal", B))
        padded = model(ids, pos, attn_mask=decode_mask(cols, cols, valid, B))[:, pad:]
    assert (alone - padded).abs().max().item() < 1e-10


def test_bad_mask_spec():
    model = llama_model()
    with pytest.raises(ValueError, match="unknown attention mask"):
        model(torch.zeros(1, 3, dtype=torch.long), attn_mask="diagonal")


def test_unsupported_rope_scaling():
    with pytest.raises(ValueError, match="yarn"):
        llama_model(rope_scaling={"rope_type": "yarn", "factor": 2.0})(torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("kw", [{}, {"attention_bias": True}, {"num_key_value_heads": 1, "tie_word_embeddings": True}])
def test_fused_projections_are_exact_views(kw, tmp_path):
    import diffcoder

    model = llama_model(seed=8, **kw).double()
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids, attn_mask=("block_causal", 4))
        model.fuse_projections()
        after = model(ids, attn_mask=("block_causal", 4))
        assert (before - after).abs().max().item() < 1e-12
        # the separate weights are views of the fused tensor: an update reaches both paths
        model.model.layers[0].self_attn.k_proj.weight.mul_(2.0)
        model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
        fused = model(ids)
        model.model.layers[0].self_attn.qkv = None
        model.model.layers[0].mlp.gate_up = None
        assert (fused - model(ids)).abs().max().item() < 1e-12
    model.mask_id = 5
    again = diffcoder.load(diffcoder.save(model, tmp_path / "fused"), dtype="float64")
    with torch.no_grad():
        assert (again(ids) - model(ids)).abs().max().item() < 1e-12


def test_cpu_bf16_packed_weights_are_bit_identical_and_never_stale(kernel_policy):
    """With oneDNN for every call (DIFFCODER_CPU_MATMUL=onednn) packed weights change nothing;
    the AMX kernel's own checks are in test_kernels.py."""
    from diffcoder.kernels.linear import packed_linear

    kernel_policy(matmul="onednn")
    model = llama_model(seed=9, tie_word_embeddings=True).to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        plain = model(ids, attn_mask=("block_causal", 4))
        model.prepare_for_decoding()
        if model.linear is not packed_linear:
            pytest.skip("oneDNN not available in this torch build")
        packed = model(ids, attn_mask=("block_causal", 4))
        assert torch.equal(plain, packed)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # an in-place update must be seen
    with torch.inference_mode():
        updated = model(ids, attn_mask=("block_causal", 4))
        model.linear = torch.nn.functional.linear
        assert torch.equal(updated, model(ids, attn_mask=("block_causal", 4)))
        assert not torch.equal(updated, plain)


def test_packed_linear_under_torch_compile_is_the_opaque_prepacked_op(kernel_policy):
    """`runner="compiled_static"` on a CPU in bf16 compiles the model's step. Inductor cannot lower
    the prepacked oneDNN op, and its own packing leaves the weights unpacked (plain matmuls, about
    half the speed), so packed_linear emits the opaque `prepacked_linear` op: the same kernel as
    eager, bit-identical to F.linear, and it sees in-place weight updates. (Calls of up to
    kernels.AMX_MAX_ROWS rows go to the AMX kernel where there is one: test_kernels.py.)"""
    from diffcoder.kernels.linear import _PACKED_WEIGHTS, packed_linear

    kernel_policy(matmul="onednn")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN not available in this torch build")
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    step = torch.compile(lambda a: packed_linear(torch.relu(a), w, None) * 2.0, dynamic=False)
    with torch.inference_mode():
        compiled = step(x)
        assert w in _PACKED_WEIGHTS  # the compiled step ran the prepacked kernel
        assert torch.equal(compiled, torch.nn.functional.linear(torch.relu(x), w) * 2.0)
    with torch.no_grad():
        w.mul_(3.0)
    with torch.inference_mode():
        assert torch.equal(step(x), torch.nn.functional.linear(torch.relu(x), w) * 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_query_groups_are_bit_identical_to_plain_gqa(dtype, kernel_policy):
    """Inference on a CPU folds each KV head's query heads into one SDPA query (faster at batch 16);
    with autograd on, attention takes the plain GQA call. Both must give the same bits, for a
    masked prefill and for a cached 4-token step."""
    from diffcoder.model import folds_query_groups

    # SDPA either way here; the native decode attention (bf16 on a CPU) agrees to bf16 rounding
    # only and is tested in test_kernels.py.
    kernel_policy(attention="torch")
    model = llama_model(seed=5).to(dtype)  # 4 query heads over 2 KV heads
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(6))
    step = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(7))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        cache = model.new_cache(3, 16)
        prefill = model(ids, attn_mask=("block_causal", 4), cache=cache)
        return prefill, model(step, attn_mask=("block_causal", 4), cache=cache, keep=0)

    with torch.no_grad():
        assert folds_query_groups(4, 2, ids.float())
        folded = run()
    with torch.enable_grad():
        assert not folds_query_groups(4, 2, ids.float())
        plain = tuple(t.detach() for t in run())
    assert all(torch.equal(a, b) for a, b in zip(folded, plain))
