"""The decode benchmark's matmul-only ceiling covers exactly the matmuls of a pass."""
import pytest
import torch

from diffcoder.bench.decode import decode_matmuls, matmul_only_passes_per_s, random_model, weight_bytes_per_pass


@pytest.mark.parametrize("fused", [False, True])
def test_decode_matmuls_are_every_weight_a_pass_reads_but_the_norms(fused: bool):
    model = random_model("tiny", torch.float32, torch.device("cpu"))
    if fused:
        model.prepare_for_decoding()
    mms = decode_matmuls(model)
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert sum(w.numel() * w.element_size() for _, w in mms) == weight_bytes_per_pass(model) - norms
    assert len(mms) == model.config.num_hidden_layers * (4 if fused else 7) + 1
    assert mms[-1][1] is model.lm_head.weight
    rate = matmul_only_passes_per_s(model, rows=4, repeats=1)
    assert rate > 0 and rate != float("inf")
