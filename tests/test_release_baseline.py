"""The benchmark's baseline (the release's approach on transformers' dynamic cache) must decode
the same tokens as our engine, or the speed-up it reports would compare different work."""
from __future__ import annotations

import pytest
import torch

import diffcoder
from release_baseline import baseline_generate  # benchmarks/release_baseline.py
from helpers import EOS, MASK, decode_model, hf_twin


@pytest.mark.parametrize("P,B,G,S,thr,eos", [(5, 4, 16, 16, None, None), (8, 4, 16, 8, None, EOS),
                                             (3, 2, 12, 6, 0.5, None), (11, 8, 16, 4, 0.9, EOS),
                                             (1, 1, 8, 8, None, None)])
def test_baseline_agrees_with_engine(P, B, G, S, thr, eos):
    model = decode_model(seed=9)
    hf = hf_twin(model)
    prompt = [(7 * i + 3) % 50 + 6 for i in range(P)]
    ref, ref_nfe = baseline_generate(hf, torch.tensor([prompt]), steps=S, gen_length=G, block_length=B,
                                    mask_id=MASK, threshold=thr, eos_id=eos)
    ours = diffcoder.generate(model, [prompt], steps=S, gen_length=G, block_length=B, threshold=thr, eos_id=eos)
    assert ours.tokens[0] == ref.tolist()
    assert ours.nfe < ref_nfe
