"""The Python API a new user meets first: `dir(diffcoder)`, `load()`, `generate` with text."""
from __future__ import annotations

import json
import shutil

import pytest

import diffcoder
from diffcoder.engine.settings import resolve


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
    full = diffcoder.generate(model, "def add(a, b):")  # gen_length: the checkpoint's generation_config.json
    assert 8 < len(full.tokens[0]) <= model.generation_defaults["gen_length"] or tok.eos_id in full.tokens[0]
    assert full.tokens[0][:len(one.tokens[0])] == one.tokens[0]  # blocks decode left to right
    with pytest.raises(TypeError, match="unknown decoder setting"):
        resolve({"block_size": 4}, model)
    with pytest.raises(ValueError, match="not a mix"):
        diffcoder.generate(model, ["x", ids[0]], gen_length=8)


def test_generate_and_infill_take_the_checkpoints_decoding_settings(tiny_model_dir, tmp_path):
    """A setting left out comes from generation_config.json, as on the command line (a shifted
    checkpoint decoded without shift writes garbage); a named one wins."""
    d = shutil.copytree(tiny_model_dir, tmp_path / "shifted")
    saved = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**saved, "shift": True, "remasking": "left_to_right"}))
    shifted, plain = diffcoder.load(d), diffcoder.load(tiny_model_dir)
    prompt, n = "def add(a, b):\n", 16
    its_own = diffcoder.generate(shifted, prompt, max_new_tokens=n).tokens
    assert its_own == diffcoder.generate(plain, prompt, max_new_tokens=n, shift=True, remasking="left_to_right").tokens
    named = diffcoder.generate(shifted, prompt, max_new_tokens=n, shift=False, remasking="low_confidence").tokens
    assert named == diffcoder.generate(plain, prompt, max_new_tokens=n).tokens
    assert named != its_own  # the settings change this prompt's output, so the two checks above can fail

    cut = ("def add(a, b):\n    ", "\n    return total\n")
    assert diffcoder.infill(shifted, *cut, gen_length=8) == diffcoder.infill(plain, *cut, gen_length=8, shift=True,
                                                                            remasking="left_to_right")
    assert diffcoder.infill(shifted, *cut, gen_length=8, shift=False) != diffcoder.infill(shifted, *cut, gen_length=8)
