"""GPU-only checks (skipped without CUDA; run by scripts/gpu_check.sh on a borrowed GPU):
the CUDA-graph runner decodes exactly what the eager runner and the release oracle decode."""
from __future__ import annotations

import random

import pytest
import torch

import diffcoder
from helpers import MASK, cases, decode_model, hf_twin, oracle_generate, rand_prompt

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("case", cases(16, seed=11), ids=lambda c: f"B{c['block_length']}-G{c['gen_length']}"
                         f"-S{c['steps']}-t{c['threshold']}-sh{int(c['shift'])}-e{c['eos_id']}")
def test_cuda_graph_runner_matches_oracle_and_eager(case):
    model = decode_model(seed=0).to("cuda")
    rng = random.Random(len(case["prompt"]))
    prompt = case.pop("prompt")
    prompts = [prompt] + [rand_prompt(rng, n) for n in (2, 9, 5)]
    graph = diffcoder.generate(model, prompts, runner="cuda_graph", **case)
    eager = diffcoder.generate(model, prompts, runner="eager", **case)
    assert graph.tokens == eager.tokens and graph.nfe == eager.nfe
    want, _ = oracle_generate(hf_twin(model.cpu()), prompt, mask_id=MASK, **case)
    assert graph.tokens[0] == want


def test_bf16_logits_close_to_transformers_on_gpu():
    model = decode_model(seed=1, std=0.1).to("cuda", torch.bfloat16)
    hf = hf_twin(model, torch.bfloat16).to("cuda")
    ids = torch.randint(0, 61, (2, 33), device="cuda")
    with torch.no_grad():
        diff = (model(ids).float() - hf(ids).logits.float()).abs().max().item()
    assert diff < 5e-2
