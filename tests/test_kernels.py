"""The native CPU kernels (diffcoder/kernels): the kernel policy, the AMX matmul (its results, its
weight cache, how packed_linear routes to it), the greedy confidence op against torch's ops, the
decode attention op against SDPA, and the fallback wherever they cannot run."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

from diffcoder import kernels
from diffcoder.engine.rules import propose
from diffcoder.kernels.linear import packed_linear
from helpers import llama_model


def library_or_skip(name: str, reason: str | None, load):  # noqa: ANN001, ANN201
    """A kernel library's ops, or a skip where this CPU cannot run it; where it can, it must load."""
    if reason is not None:
        pytest.skip(f"{name} kernel: {reason}")
    ops = load()
    assert ops is not None, f"this CPU has {name}, so the kernel must build and load (see the warning)"
    return ops


@pytest.fixture(scope="module")
def amx():
    return library_or_skip("AMX", kernels.amx_unsupported_reason(), kernels.native_ops)


@pytest.fixture(scope="module")
def avx512():
    return library_or_skip("AVX-512", kernels.avx512_unsupported_reason(), kernels.avx512_ops)


@pytest.fixture(scope="module")
def confidence_lib():
    """The library whose greedy_confidence op this CPU runs (AMX's, else AVX-512's)."""
    ops = kernels.native_ops() if kernels.amx_unsupported_reason() is None else None
    if ops is None and kernels.avx512_unsupported_reason() is None:
        ops = kernels.avx512_ops()
    if ops is None:
        pytest.skip("the confidence op needs a CPU with AVX-512")
    return ops


def within_one_bf16_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """y agrees with the float64 product rounded to bf16 up to one bf16 step (fp32 sums in any
    order stay well inside that; a wrong layout, a lost row or column, or a missing bias does not)."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    step = ref.abs().to(torch.bfloat16).double() * 2.0**-7 + 1e-30
    return y.shape == ref.shape and bool(((y.double() - ref).abs() <= step).all())


def test_the_kernel_policy_comes_from_the_environment_and_refuses_unknown_values():
    policy = kernels.KernelPolicy.from_env({"DIFFCODER_CPU_MATMUL": "onednn", "DIFFCODER_CPU_CONFIDENCE": "torch"})
    assert policy == kernels.KernelPolicy(matmul="onednn", attention="auto", confidence="torch")
    assert kernels.KernelPolicy.from_env({}) == kernels.KernelPolicy()
    for var, value in (("DIFFCODER_CPU_MATMUL", "mkl"), ("DIFFCODER_CPU_ATTENTION", "flash"),
                       ("DIFFCODER_CPU_CONFIDENCE", "fast")):
        with pytest.raises(ValueError, match=f"{value!r} \\(\\${var}\\) is not one of auto"):
            kernels.KernelPolicy.from_env({var: value})
    with pytest.raises(ValueError, match="fold_query_groups='yes' is not one of auto, on, off"):
        kernels.KernelPolicy(fold_query_groups="yes")
    assert kernels.KernelPolicy().folds_query_groups("cpu") and not kernels.KernelPolicy().folds_query_groups("cuda")
    assert kernels.KernelPolicy(fold_query_groups="on").folds_query_groups("cuda")


def test_using_policy_changes_it_for_the_block_only():
    before = kernels.current_policy()
    with kernels.using_policy(attention="torch") as outer:
        assert kernels.current_policy() is outer and outer.attention == "torch"
        with kernels.using_policy(confidence="torch"):
            assert kernels.current_policy() == kernels.KernelPolicy(before.matmul, "torch", "torch",
                                                                    before.fold_query_groups)
        assert kernels.current_policy() is outer
        with pytest.raises(ValueError):
            with kernels.using_policy(matmul="mkl"):
                pass
        assert kernels.current_policy() is outer
    assert kernels.current_policy() is before


def test_a_compiled_function_follows_the_policy_it_runs_under():
    """torch.compile guards on the policy a traced function reads: a step run under another
    policy is traced again, and a policy seen before reuses its trace."""
    traces = []

    def backend(gm, example_inputs):  # noqa: ANN001, ANN202
        traces.append(gm)
        return gm.forward

    step = torch.compile(lambda x: x + 1 if kernels.folds_query_groups(x.device) else x - 1, backend=backend,
                         fullgraph=True)
    x = torch.zeros(2)
    with kernels.using_policy(fold_query_groups="on"):
        assert step(x).tolist() == [1.0, 1.0]
    with kernels.using_policy(fold_query_groups="off"):
        assert step(x).tolist() == [-1.0, -1.0]
    with kernels.using_policy(fold_query_groups="on"):
        assert step(x).tolist() == [1.0, 1.0]
    assert len(traces) == 2


@pytest.mark.parametrize("rows,out_features,in_features,bias", [
    (1, 16, 32, False), (4, 960, 576, False), (8, 576, 1536, True), (16, 37, 100, True),
    (17, 49, 33, False), (24, 576, 576, True), (64, 40, 64, True), (100, 24, 160, False),
])
def test_amx_linear_matches_the_exact_product_within_bf16_rounding(amx, rows, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(2, rows, in_features, generator=gen).to(torch.bfloat16)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    b = torch.randn(out_features, generator=gen).to(torch.bfloat16) if bias else None
    y = amx.amx_linear(x, amx.pack_amx(w), out_features, b)
    assert y.dtype == torch.bfloat16 and within_one_bf16_rounding(y, x, w, b)
    # a strided input (a slice of wider rows) gives the same bits as its contiguous copy
    strided = torch.cat([x, x[..., :8]], dim=-1)[..., :in_features]
    assert not strided.is_contiguous() and torch.equal(amx.amx_linear(strided, amx.pack_amx(w), out_features, b), y)


@pytest.mark.parametrize("rows", [8, 64, 128, 80])
def test_amx_linear_gives_each_row_the_same_bits_at_any_batch_size(amx, rows):
    """A short x is read in place as one shortened tile and a long one as up to four m tiles per
    panel, but every output sums over k in the same order: a row's result does not depend on the
    rows batched with it (batched decoding gives each sequence what it gets alone)."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    w = torch.randn(3 * 16 + 8, 576, generator=gen).to(torch.bfloat16)  # an odd number of panels, the last short
    packed = amx.pack_amx(w)
    together = amx.amx_linear(x, packed, w.shape[0], None)
    alone = torch.cat([amx.amx_linear(x[i:i + 4], packed, w.shape[0], None) for i in range(0, rows, 4)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("rows,out_features,in_features,bias", [
    (1, 16, 32, False), (4, 960, 576, False), (8, 576, 1536, True), (16, 37, 100, True),
    (17, 49, 33, False), (7, 5, 17, True), (64, 130, 896, True), (100, 24, 160, False), (3, 1, 7, True),
])
def test_avx512_linear_matches_the_exact_product_within_bf16_rounding(avx512, rows, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(2, rows, in_features, generator=gen).to(torch.bfloat16)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    b = torch.randn(out_features, generator=gen).to(torch.bfloat16) if bias else None
    y = avx512.bf16_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and within_one_bf16_rounding(y, x, w, b)
    strided = torch.cat([x, x[..., :8]], dim=-1)[..., :in_features]
    assert not strided.is_contiguous() and torch.equal(avx512.bf16_linear(strided, w, b), y)
    # the weight in place, or a transposed view of one: the same bits
    assert torch.equal(avx512.bf16_linear(x, w.T.contiguous().T, b), y)


def test_avx512_linear_rounds_like_torch_and_keeps_nans_and_infinities(avx512):
    """One exact product per output (one nonzero term), so the only rounding is the final fp32 ->
    bf16 one: it must be torch's (nearest even), and NaN and inf must come through."""
    values = torch.tensor([1.0, -2.5, 3.0e38, float("inf"), float("-inf"), float("nan"), 1e-40, 0.0])
    x = torch.tensor([[1.0, 0.0]]).to(torch.bfloat16)
    w = torch.stack([values, torch.zeros_like(values)], dim=1).to(torch.bfloat16)
    y = avx512.bf16_linear(x, w, None)
    ref = F.linear(x.float(), w.float()).to(torch.bfloat16)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y[~y.isnan()], ref[~ref.isnan()])
    # a sum that needs rounding: 1 + 2^-8 + 2^-9 (ties and above-ties at bf16's 8 bits)
    x = torch.tensor([[1.0, 1.0, 1.0]]).to(torch.bfloat16)
    w = torch.tensor([[1.0, 2.0**-8, 2.0**-9], [1.0, 2.0**-8, 0.0], [-1.0, -(2.0**-8), 0.0]]).to(torch.bfloat16)
    assert torch.equal(avx512.bf16_linear(x, w, None), F.linear(x.float(), w.float()).to(torch.bfloat16))


@pytest.mark.parametrize("rows", [8, 64, 130])
def test_avx512_linear_gives_each_row_the_same_bits_at_any_batch_size(avx512, rows):
    """Rows are tiled by up to 6 and columns by 4, but every output sums over k in the same order:
    a sequence's result does not depend on the rows batched with it."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    w = torch.randn(3 * 64 + 7, 576, generator=gen).to(torch.bfloat16)
    together = avx512.bf16_linear(x, w, None)
    alone = torch.cat([avx512.bf16_linear(x[i:i + 1], w, None) for i in range(rows)])
    assert torch.equal(together, alone)


def test_avx512_linear_rejects_mismatched_inputs_with_a_clear_message(avx512):
    w = torch.randn(32, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="x has 63 features, the weight"):
        avx512.bf16_linear(torch.randn(2, 63).to(torch.bfloat16), w, None)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        avx512.bf16_linear(torch.randn(2, 64), w, None)
    with pytest.raises(RuntimeError, match="bias must be bfloat16 with out_features"):
        avx512.bf16_linear(torch.randn(2, 64).to(torch.bfloat16), w, torch.zeros(31).to(torch.bfloat16))


def test_packed_linear_takes_the_avx512_kernel_where_bf16_products_are_emulated(avx512, kernel_policy, monkeypatch):
    """auto: every bf16 call runs the AVX-512 kernel on a CPU without AMX or avx512_bf16, and none on
    one with them (oneDNN multiplies bf16 natively there); "avx512" forces it, "onednn" refuses it."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 64, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, 200, 64, generator=gen).to(torch.bfloat16)
    monkeypatch.setitem(kernels._LOADED, "ops", None)  # as on a CPU without AMX
    with torch.inference_mode():
        kernel_policy(matmul="avx512")
        assert torch.equal(packed_linear(x, w, None), avx512.bf16_linear(x, w, None))
        kernel_policy(matmul="auto")
        monkeypatch.setitem(kernels._LOADED, "bf16_products", False)
        assert torch.equal(packed_linear(x, w, None), avx512.bf16_linear(x, w, None))
        monkeypatch.setitem(kernels._LOADED, "bf16_products", True)
        assert kernels.avx512_for(4) is None and torch.equal(packed_linear(x, w, None), F.linear(x, w))
        kernel_policy(matmul="onednn")
        assert kernels.avx512_for(4) is None and torch.equal(packed_linear(x, w, None), F.linear(x, w))


def test_a_bf16_model_on_the_avx512_kernel_agrees_with_onednn(avx512, kernel_policy):
    model = llama_model(seed=9, tie_word_embeddings=True).to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        model.prepare_for_decoding()
        kernel_policy(matmul="avx512")
        with torch.profiler.profile() as prof:
            on_avx512 = model(ids, attn_mask=("block_causal", 4)).float()
        kernel_policy(matmul="onednn")
        on_onednn = model(ids, attn_mask=("block_causal", 4)).float()
    calls = sum(e.count for e in prof.key_averages() if e.key == "diffcoder_avx512::bf16_linear")
    assert calls == 4 * len(model.model.layers) + 1  # fused q/k/v, o, fused gate/up, down per layer; the head
    assert (on_avx512 - on_onednn).abs().max().item() < 0.05 * on_onednn.abs().max().item()


@pytest.mark.slow
def test_a_compiled_step_calls_the_avx512_kernel(avx512, kernel_policy):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 32, generator=gen).to(torch.bfloat16)
    kernel_policy(matmul="avx512")
    step = torch.compile(lambda a: packed_linear(torch.relu(a), w, None) * 2.0, dynamic=False)
    with torch.inference_mode():
        assert torch.equal(step(x), avx512.bf16_linear(torch.relu(x), w, None) * 2.0)


def test_amx_linear_rejects_mismatched_inputs_with_a_clear_message(amx):
    w = torch.randn(32, 64).to(torch.bfloat16)
    packed = amx.pack_amx(w)
    with pytest.raises(RuntimeError, match="features but the weight was packed for"):
        amx.amx_linear(torch.randn(4, 96).to(torch.bfloat16), packed, 32, None)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        amx.amx_linear(torch.randn(4, 64), packed, 32, None)
    with pytest.raises(RuntimeError, match="does not match the packed weight"):
        amx.amx_linear(torch.randn(4, 64).to(torch.bfloat16), packed, 64, None)


def test_packed_weights_follow_in_place_updates_new_storage_and_freed_weights(amx):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=gen).to(torch.bfloat16)
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    first = amx.packed_linear(x, w, None)
    assert torch.equal(first, amx.amx_linear(x, amx.pack_amx(w), 48, None))
    with torch.no_grad():
        w.mul_(3.0)  # in place: the version counter moves
    assert torch.equal(amx.packed_linear(x, w, None), amx.amx_linear(x, amx.pack_amx(w), 48, None))
    assert not torch.equal(amx.packed_linear(x, w, None), first)
    w.data = torch.randn(48, 64, generator=gen).to(torch.bfloat16)  # new storage, same tensor object
    assert torch.equal(amx.packed_linear(x, w, None), amx.amx_linear(x, amx.pack_amx(w), 48, None))
    live = amx.packed_weights()
    del w
    gc.collect()
    amx.packed_linear(x, torch.randn(16, 64).to(torch.bfloat16), None)  # adding an entry drops dead ones
    assert amx.packed_weights() <= live


def test_packed_linear_routes_decode_sized_calls_to_amx_and_the_rest_to_onednn(amx, kernel_policy):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 64, generator=gen).to(torch.bfloat16)
    small = torch.randn(1, 8, 64, generator=gen).to(torch.bfloat16)
    large = torch.randn(1, kernels.AMX_MAX_ROWS + 1, 64, generator=gen).to(torch.bfloat16)
    linear = packed_linear
    with torch.inference_mode():
        assert torch.equal(linear(small, w, None), amx.packed_linear(small, w, None))
        assert torch.equal(linear(large, w, None), F.linear(large, w))  # oneDNN: bit-identical
        kernel_policy(matmul="onednn")
        assert torch.equal(linear(small, w, None), F.linear(small, w))
        with pytest.raises(ValueError, match="is not one of auto, amx, onednn"):
            kernel_policy(matmul="mkl")


@pytest.mark.slow
def test_a_compiled_step_calls_the_amx_kernel_and_sees_weight_updates(amx):
    linear = packed_linear
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 32, generator=gen).to(torch.bfloat16)
    step = torch.compile(lambda a: linear(torch.relu(a), w, None) * 2.0, dynamic=False)
    with torch.inference_mode():
        assert torch.equal(step(x), amx.packed_linear(torch.relu(x), w, None) * 2.0)
    with torch.no_grad():
        w.mul_(3.0)
    with torch.inference_mode():
        assert torch.equal(step(x), amx.packed_linear(torch.relu(x), w, None) * 2.0)


def test_a_bf16_model_on_amx_agrees_with_onednn(amx, kernel_policy):
    """The whole model wired through the kernel: same logits as the oneDNN path up to bf16 rounding
    noise (a wrong weight or a swapped projection would be far off)."""
    model = llama_model(seed=9, tie_word_embeddings=True).to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(4))
    before = amx.packed_weights()
    with torch.inference_mode():
        model.prepare_for_decoding()
        on_amx = model(ids, attn_mask=("block_causal", 4)).float()
        kernel_policy(matmul="onednn")
        on_onednn = model(ids, attn_mask=("block_causal", 4)).float()
    assert amx.packed_weights() >= before + 2 * len(model.model.layers)  # the AMX path really ran
    assert (on_amx - on_onednn).abs().max().item() < 0.05 * on_onednn.abs().max().item()


def torch_propose(logits: torch.Tensor, masked: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    with kernels.using_policy(confidence="torch"):
        return propose(logits, masked, mask_id=mask_id)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab,mask_id", [(49152, 5), (1000, 0), (1000, 999), (17, 16), (1, 0)])
def test_greedy_confidence_agrees_with_torchs_float64_ops(confidence_lib, dtype, vocab, mask_id):
    """Same tokens; float64 confidences equal up to the order of the float64 additions (a few ulps).
    Logits past 16-wide chunks, the mask token at either end, and a vocabulary of one (the chosen
    token is then the mask token, whose confidence is 0) are all covered."""
    gen = torch.Generator().manual_seed(vocab + mask_id)
    logits = (torch.randn(3, 4, vocab, generator=gen) * 4).to(dtype)
    logits[0, 0, mask_id] = 1e4  # the largest logit is the mask token's: it counts in the softmax only
    masked = torch.rand(3, 4, generator=gen) > 0.25
    conf, x0 = propose(logits, masked, mask_id=mask_id)
    ref_conf, ref_x0 = torch_propose(logits, masked, mask_id)
    assert conf.dtype == torch.float64 and torch.equal(x0, ref_x0)
    assert not masked.all() and (x0[~masked] == mask_id).all() and (conf[~masked] == float("-inf")).all()
    assert torch.equal(torch.isinf(conf), torch.isinf(ref_conf))
    finite = ~torch.isinf(ref_conf)
    assert torch.allclose(conf[finite], ref_conf[finite], rtol=1e-13, atol=0)


def test_greedy_confidence_follows_torch_on_ties_infinities_and_nans(confidence_lib):
    logits = torch.zeros(5, 40)
    logits[0, [7, 9]] = 5.0  # a tie: the first index wins
    logits[1, 3] = float("nan")  # NaN is the maximum, the confidence NaN
    logits[2, 5] = float("nan")  # NaN at the mask token: not chosen, still NaN confidence
    logits[3] = float("-inf")  # nothing beats -inf: index 0
    logits[4, 11] = float("inf")
    masked = torch.ones(5, dtype=torch.bool)
    conf, x0 = propose(logits, masked, mask_id=5)
    ref_conf, ref_x0 = torch_propose(logits, masked, 5)
    assert x0.tolist() == ref_x0.tolist() == [7, 3, 0, 0, 11]
    assert torch.equal(conf.isnan(), ref_conf.isnan()) and conf.isnan().tolist() == [False, True, True, True, True]
    assert conf[0].item() == pytest.approx(ref_conf[0].item(), rel=1e-15)


def test_a_compiled_step_calls_the_confidence_op(confidence_lib):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 300, generator=gen).to(torch.bfloat16)
    masked = torch.tensor([[True, False, True, True], [True, True, True, False]])
    step = torch.compile(lambda lg, m: propose(lg * 2, m, mask_id=7), dynamic=False)
    conf, x0 = step(logits, masked)
    ref_conf, ref_x0 = confidence_lib.greedy_confidence(logits * 2, 7)  # every row
    assert torch.equal(x0, torch.where(masked, ref_x0, 7))  # the masked rows only: the rest skipped
    assert torch.equal(conf, torch.where(masked, ref_conf, torch.full_like(ref_conf, float("-inf"))))
    with pytest.raises(RuntimeError, match="masked must be boolean"):
        confidence_lib.greedy_confidence(logits, 7, masked[:, :3])


def test_the_confidence_policy_is_checked_and_can_switch_the_op_off(confidence_lib, kernel_policy):
    logits = torch.randn(2, 50).to(torch.bfloat16)
    assert kernels.confidence_ops(logits) is confidence_lib
    assert kernels.confidence_ops(logits.double()) is None  # float64 logits: torch's ops
    kernel_policy(confidence="torch")
    assert kernels.confidence_ops(logits) is None
    with pytest.raises(ValueError, match="DIFFCODER_CPU_CONFIDENCE"):
        kernel_policy(confidence="fast")
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        confidence_lib.greedy_confidence(logits.double(), 0)


def reference_attention(q, k, v, mask):  # noqa: ANN001, ANN201
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


@pytest.mark.parametrize("batch,heads,rows,keys,dim,mask_shape", [
    (1, 3, 12, 128, 64, "batch"),  # a smol-135m decode step: 3 query heads folded onto each KV head
    (16, 3, 24, 128, 64, "batch"),  # batch 16's fused commit pass: 8 tokens x 3 heads (two lane groups)
    (2, 2, 5, 37, 32, "head"),  # a mask per head, keys not a multiple of 16
    (2, 1, 17, 300, 128, "none"),
    (3, 2, 8, 40, 16, "row"),  # one mask row shared by every query row
])
def test_decode_attention_agrees_with_sdpa_to_bf16_rounding(amx, batch, heads, rows, keys, dim, mask_shape):
    gen = torch.Generator().manual_seed(batch * 100 + rows)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen).to(torch.bfloat16) for n in (rows, keys, keys))
    mask = {"batch": lambda: torch.rand(batch, 1, rows, keys, generator=gen) > 0.3,
            "head": lambda: torch.rand(batch, heads, rows, keys, generator=gen) > 0.3,
            "row": lambda: torch.rand(batch, 1, 1, keys, generator=gen) > 0.3,
            "none": lambda: None}[mask_shape]()
    if mask is not None:
        mask[..., keys // 2:] = False  # a static cache's unused tail: skipped, must still be excluded
        mask[..., 0] = True
    out = amx.decode_attention(q, k, v, mask, dim ** -0.5)
    ref = reference_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert (out.float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item() + 1e-3


def test_decode_attention_reads_strided_caches_and_zeroes_rows_that_see_nothing(amx):
    gen = torch.Generator().manual_seed(8)
    cache_k = torch.randn(2, 3, 50, 64, generator=gen).to(torch.bfloat16)
    cache_v = torch.randn(2, 3, 50, 64, generator=gen).to(torch.bfloat16)
    k, v = cache_k[:, :, :20], cache_v[:, :, :20]  # the dynamic cache's view of its first 20 columns
    q = torch.randn(2, 3, 6, 64, generator=gen).to(torch.bfloat16)
    mask = torch.ones(2, 1, 6, 20, dtype=torch.bool)
    mask[1, 0, 2] = False  # this row may see no key: zeros, as SDPA gives
    out = amx.decode_attention(q, k, v, mask, 0.125)
    ref = reference_attention(q, k.contiguous(), v.contiguous(), mask)
    assert not k.is_contiguous() and torch.equal(out[1, :, 2], torch.zeros(3, 64, dtype=torch.bfloat16))
    assert (out.float() - ref).abs().max().item() < 0.02
    with pytest.raises(RuntimeError, match="multiple of 16"):
        amx.decode_attention(q[..., :24], k[..., :24], v[..., :24], mask, 0.125)
    with pytest.raises(RuntimeError, match="must be boolean"):
        amx.decode_attention(q, k, v, mask.float(), 0.125)


@pytest.mark.parametrize("dim", [64, 16])  # AMX tiles, and the AVX-512 loops of other head sizes
def test_decode_attention_ignores_whatever_the_unseen_cache_columns_hold(amx, dim):
    """A static cache's columns past the sequence hold stale values or were never written: NaN and
    infinities there, in blocks the op reads whole, must not reach any row's result."""
    gen = torch.Generator().manual_seed(dim)
    q = torch.randn(2, 3, 12, dim, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, 3, 64, dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    mask = torch.zeros(2, 1, 12, 64, dtype=torch.bool)
    mask[..., :21] = True  # the first 16-key block whole, the second partly
    clean = amx.decode_attention(q, k, v, mask, dim ** -0.5)
    k[:, :, 21:], v[:, :, 21:] = float("nan"), float("inf")
    assert torch.equal(amx.decode_attention(q, k, v, mask, dim ** -0.5), clean)


def test_a_bf16_model_attends_natively_in_a_decode_step_and_agrees_with_sdpa(amx, monkeypatch):
    """Routing: a bf16 model's cached steps fold their query heads and take the native op (up to
    ATTENTION_MAX_ROWS rows; longer prefills stay on SDPA); same logits as SDPA up to bf16 noise."""
    model = llama_model(seed=5).to(torch.bfloat16)  # 4 query heads over 2 KV heads
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(6))
    step = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(7))

    def decode_step() -> torch.Tensor:
        cache = model.new_cache(3, 16)
        model(ids, attn_mask=("block_causal", 4), cache=cache)
        return model(step, attn_mask=("block_causal", 4), cache=cache, keep=0).float()

    calls = []
    real = kernels.attention_ops
    monkeypatch.setattr(kernels, "attention_ops", lambda *a: calls.append(a[3]) or real(*a))
    with torch.inference_mode():
        native = decode_step()
        with kernels.using_policy(attention="torch"):
            sdpa = decode_step()
    assert set(calls) == {2 * 12, 2 * 4}  # folded rows: the 12-token prefill's and the step's
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert real(cpu, bf16, 64, kernels.ATTENTION_MAX_ROWS + 1, None) is None  # a long prefill stays on SDPA
    assert real(cpu, bf16, 64, 4, None) is amx
    assert (native - sdpa).abs().max().item() < 0.05 * sdpa.abs().max().item()
    assert not torch.equal(native, sdpa)  # the native op really ran (its sums round differently)


def rope_reference(heads, cos, sin, n_heads):  # noqa: ANN001, ANN201
    """The unfused step: rotary in fp32 rounded once to bf16 (as the compiled step computes it)."""
    from diffcoder.model import rotate_half

    h = heads.float().transpose(1, 2)
    qk = (h[:, :n_heads + (h.shape[1] - n_heads) // 2] * cos.float()
          + rotate_half(h[:, :n_heads + (h.shape[1] - n_heads) // 2]) * sin.float()).to(torch.bfloat16)
    return qk[:, :n_heads], qk[:, n_heads:], h[:, qk.shape[1]:].to(torch.bfloat16)


@pytest.mark.parametrize("batch_cos", [3, 1])  # the rotary tables per sequence, or shared
def test_rope_cache_attention_writes_the_cache_and_attends_like_the_unfused_ops(amx, batch_cos):
    gen = torch.Generator().manual_seed(batch_cos)
    b, t, n_heads, kv, d, cols = 3, 4, 6, 2, 64, 40
    heads = torch.randn(b, t, n_heads + 2 * kv, d, generator=gen).to(torch.bfloat16)
    angles = torch.rand(batch_cos, 1, t, d, generator=gen) * 6
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    k_cache, v_cache = (torch.randn(b, kv, cols, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write, keys = torch.arange(20, 24), 24
    mask = torch.rand(b, 1, n_heads // kv * t, keys, generator=gen) > 0.3
    mask[..., 0] = True
    out = amx.rope_cache_attention(heads, cos, sin, k_cache, v_cache, write, keys, n_heads, mask, d ** -0.5)
    qs, ks, vs = rope_reference(heads, cos, sin, n_heads)
    k_ref[:, :, write], v_ref[:, :, write] = ks, vs
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # columns past `keys` untouched too
    ref = reference_attention(qs.reshape(b, kv, -1, d), k_ref[:, :, :keys], v_ref[:, :, :keys], mask)
    assert out.shape == (b, kv, n_heads // kv * t, d)
    assert (out.float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item() + 1e-3
    with pytest.raises(RuntimeError, match="outside the 24 keys"):
        amx.rope_cache_attention(heads, cos, sin, k_cache, v_cache, write + 1, keys, n_heads, mask, 1.0)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        amx.rope_cache_attention(heads[..., :16], cos[..., :16], sin[..., :16], k_cache[..., :16], v_cache[..., :16],
                                 write, keys, n_heads, None, 1.0)


def test_the_attention_ops_read_one_mask_row_per_token_as_the_repeated_mask(amx):
    """A folded query's row g * tokens + t is token t of query head g: given one mask row per
    token, the ops give bit for bit what they give with the mask repeated per head (which is what
    SDPA needs, and what the model builds only for SDPA); other row counts are refused."""
    gen = torch.Generator().manual_seed(11)
    b, t, n_heads, kv, d, keys = 2, 4, 6, 2, 64, 30
    heads = torch.randn(b, t, n_heads + 2 * kv, d, generator=gen).to(torch.bfloat16)
    angles = torch.rand(1, 1, t, d, generator=gen) * 6
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    caches = [torch.randn(b, kv, keys, d, generator=gen).to(torch.bfloat16) for _ in range(2)]
    per_token = torch.rand(b, 1, t, keys, generator=gen) > 0.4
    per_token[..., 0] = True
    repeated = per_token.repeat(1, 1, n_heads // kv, 1)
    write = torch.arange(keys - t, keys)

    def step(mask):  # noqa: ANN001, ANN202
        k, v = (c.clone() for c in caches)
        return amx.rope_cache_attention(heads, cos, sin, k, v, write, keys, n_heads, mask, d ** -0.5), k, v

    for got, want in zip(step(per_token), step(repeated)):
        assert torch.equal(got, want)
    q = torch.randn(b, kv, n_heads // kv * t, d, generator=gen).to(torch.bfloat16)
    assert torch.equal(amx.decode_attention(q, *caches, per_token, 0.125), amx.decode_attention(q, *caches, repeated, 0.125))
    with pytest.raises(RuntimeError, match="a divisor of rows"):
        amx.decode_attention(q, *caches, repeated[:, :, :5].contiguous(), 0.125)


@pytest.mark.parametrize("static", [False, True])
def test_a_fused_bf16_model_steps_on_rope_cache_attention_and_agrees_with_sdpa(amx, monkeypatch, kernel_policy,
                                                                               static):
    """With fused q/k/v and a head size that is a multiple of 32, a cached decode step (dynamic
    cache, or the static runner's write columns) takes the one-op path; its logits and its cache
    agree with the unfused ops (SDPA) up to bf16 noise."""
    from diffcoder.masks import decode_mask

    model = llama_model(seed=9, hidden_size=128, head_dim=32).to(torch.bfloat16).fuse_projections()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    step = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(2))

    def decode_step() -> tuple[torch.Tensor, torch.Tensor]:
        cache = model.new_cache(2, 16)
        model(ids, attn_mask=("block_causal", 4), cache=cache)
        if not static:
            logits = model(step, attn_mask=("block_causal", 4), cache=cache, keep=0)
        else:
            cols = torch.arange(16)
            mask = decode_mask(cols[8:12], cols, torch.ones(2, 16, dtype=torch.bool) & (cols < 12), 4)
            logits = model(step, torch.arange(8, 12).expand(2, 4), attn_mask=mask, cache=cache,
                           cache_cols=torch.arange(8, 12))
        return logits.float(), cache.k[0][:, :, :12].float()

    calls = []
    original = model.model.layers[0].self_attn._native_attention.__func__
    monkeypatch.setattr(type(model.model.layers[0].self_attn), "_native_attention",
                        lambda self, *a: calls.append(1) or original(self, *a))
    with torch.inference_mode():
        native, native_cache = decode_step()
        n_native = len(calls)
        kernel_policy(attention="torch")
        sdpa, sdpa_cache = decode_step()
    assert n_native == 2 * model.config.num_hidden_layers  # the 8-token prefill (16 folded rows) and the step
    assert len(calls) == n_native  # none under DIFFCODER_CPU_ATTENTION=torch
    assert (native - sdpa).abs().max().item() < 0.05 * sdpa.abs().max().item()
    assert (native_cache - sdpa_cache).abs().max().item() < 0.05 * sdpa_cache.abs().max().item()


def test_without_amx_the_kernel_is_skipped_with_one_warning(monkeypatch, kernel_policy):
    monkeypatch.setattr(kernels, "_LOADED", {})
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2"})
    with pytest.warns(RuntimeWarning, match="this CPU lacks amx_tile"):
        assert kernels.amx_for(4) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.amx_for(4) is None  # decided once: no second warning
    with kernels.using_policy(matmul="amx"), \
            pytest.raises(RuntimeError, match="DIFFCODER_CPU_MATMUL=amx, but the AMX kernel is unavailable"):
        kernels.amx_for(4)
    w = torch.randn(8, 32).to(torch.bfloat16)
    x = torch.randn(4, 32).to(torch.bfloat16)
    kernel_policy(matmul="auto")
    with torch.inference_mode():
        assert torch.equal(packed_linear(x, w, None), F.linear(x, w))
    assert kernels.confidence_ops(x) is None  # confidences fall back to torch's ops as well


def test_a_kernel_that_does_not_compile_falls_back_and_says_why(tmp_path, monkeypatch):
    if kernels.amx_unsupported_reason() is not None:
        pytest.skip("the build is only attempted on CPUs with AMX")
    broken = tmp_path / "amx_linear.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(kernels, "SOURCES", (broken,))
    monkeypatch.setattr(kernels, "_LOADED", {})
    with pytest.warns(RuntimeWarning, match="did not build or load.*error"):
        assert kernels.native_ops() is None
    assert not kernels.library_path().exists()  # nothing half-built left where a later run would load it


def test_an_avx512_kernel_that_does_not_compile_falls_back_to_onednn_and_says_why(tmp_path, monkeypatch, kernel_policy):
    if kernels.avx512_unsupported_reason() is not None:
        pytest.skip("the build is only attempted on CPUs with AVX-512")
    broken = tmp_path / "avx512_linear.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(kernels, "AVX512_SOURCES", (broken,))
    monkeypatch.setattr(kernels, "_LOADED", {"ops": None, "bf16_products": False})
    with pytest.warns(RuntimeWarning, match="AVX-512 matmul kernel is not used: it did not build or load.*error"):
        assert kernels.avx512_for(4) is None
    assert not kernels.library_path(kernels.AVX512_SOURCES, kernels.AVX512_COMPILE_FLAGS, "avx512_kernels").exists()
    w, x = torch.randn(8, 32).to(torch.bfloat16), torch.randn(4, 32).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed_linear(x, w, None), F.linear(x, w))
    kernel_policy(matmul="avx512")
    with pytest.raises(RuntimeError, match="DIFFCODER_CPU_MATMUL=avx512, but the AVX-512 kernel is unavailable"):
        kernels.avx512_for(4)


@pytest.mark.slow
def test_the_attention_benchmark_checks_the_op_and_ends_with_json(amx):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "benchmarks/attention_kernels.py", "--batch-sizes", "2", "--rows", "12",
                          "--repeats", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert {row["method"] for row in lines[:-1]} == {"native op (diffcoder)", "SDPA"}
    assert all(row["us_per_call"] > 0 for row in lines[:-1])
    assert lines[-1]["name"] == "attention_kernels" and set(lines[-1]["sdpa_over_native"]) == {"batch2_rows12"}
