"""The Python API a new user meets first: `dir(diffcoder)`, `load()`, `generate` with text."""
from __future__ import annotations

import pytest

import diffcoder


def test_dir_lists_the_lazy_exports():
    names = dir(diffcoder)
    assert set(diffcoder.__all__) <= set(names) and "__version__" in names


def test_load_without_a_path_is_the_default_model():
    model = diffcoder.load()
    assert model.tokenizer is not None
    assert model.config == diffcoder.load(diffcoder.default_model_dir()).config


def test_generate_takes_text_and_defaults_steps(tiny_model_dir):
    model = diffcoder.load(tiny_model_dir)
    tok = model.tokenizer
    ids = [tok.encode("def add(a, b):"), tok.encode("x = ")]
    want = diffcoder.generate(model, ids, steps=8, gen_length=8, eos_id=tok.eos_id)
    assert want.texts is None
    alone = diffcoder.generate(model, ids[:1], steps=8, gen_length=8, eos_id=tok.eos_id)
    one = diffcoder.generate(model, "def add(a, b):", max_new_tokens=8)
    assert one.tokens == alone.tokens == want.tokens[:1] and one.nfe == alone.nfe  # steps default to gen_length
    assert one.texts == [tok.decode([t for t in want.tokens[0] if t != tok.eos_id])]
    both = diffcoder.generate(model, ["def add(a, b):", "x = "], gen_length=8, max_new_tokens=8)
    assert both.tokens == want.tokens and len(both.texts) == 2
    with pytest.raises(ValueError, match="give one"):
        diffcoder.generate(model, "x", gen_length=8, max_new_tokens=16)
    with pytest.raises(TypeError, match="gen_length"):
        diffcoder.generate(model, "x")
    with pytest.raises(ValueError, match="not a mix"):
        diffcoder.generate(model, ["x", ids[0]], gen_length=8)
