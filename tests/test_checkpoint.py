"""Load/save round trips (single file and sharded), transformers interop, and loader errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import diffcoder
from diffcoder.checkpoint import INDEX_NAME, WEIGHTS_NAME
from diffcoder.tokenizer import Tokenizer


def test_round_trip_and_transformers_interop(tiny_model_dir, tmp_path):
    import transformers

    model = diffcoder.load(tiny_model_dir)
    assert model.tokenizer is not None and model.mask_id == model.tokenizer.mask_id
    out = diffcoder.save(model, tmp_path / "copy")
    again = diffcoder.load(out)
    ids = torch.tensor([model.tokenizer.encode("def add(a, b):")])
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
        hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("x = 1", add_special_tokens=False)) == "x = 1"


def test_sharded_round_trip(tiny_model_dir, tmp_path):
    model = diffcoder.load(tiny_model_dir)
    out = diffcoder.save(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (out / WEIGHTS_NAME).exists()
    again = diffcoder.load(out, dtype="float64")
    assert again.dtype == torch.float64
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (again(ids) - model.double()(ids)).abs().max().item() < 1e-6
    # The weights' identity covers every shard: one changed shard changes it.
    from diffcoder.checkpoint import weights_sha256

    assert again.source == out
    before = weights_sha256(out)
    resaved = diffcoder.save(diffcoder.load(tiny_model_dir), tmp_path / "again", max_shard_bytes=20_000)
    assert before == weights_sha256(resaved)  # the same weights, the same identity
    last = out / sorted(shards)[-1]
    last.write_bytes(last.read_bytes()[:-1] + b" ")
    assert weights_sha256(out) != before


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_load_dtype(tiny_model_dir, dtype):
    model = diffcoder.load(tiny_model_dir, dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())


def test_tied_embeddings_round_trip(tmp_path):
    from diffcoder.config import ModelConfig
    from diffcoder.model import DiffCoderLM

    model = DiffCoderLM(ModelConfig(vocab_size=40, tie_word_embeddings=True, mask_token_id=3)).init_weights(1)
    out = diffcoder.save(model, tmp_path / "tied")
    again = diffcoder.load(out)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_save_is_atomic_replace(tiny_model_dir, tmp_path):
    model = diffcoder.load(tiny_model_dir)
    target = tmp_path / "ckpt"
    diffcoder.save(model, target)
    diffcoder.save(model, target)  # replacing an existing checkpoint leaves no temp dirs behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_missing_shard(tiny_model_dir, tmp_path):
    out = diffcoder.save(diffcoder.load(tiny_model_dir), tmp_path / "s", max_shard_bytes=20_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        diffcoder.load(out)


def test_error_truncated_file(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "t")
    f = d / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        diffcoder.load(d)


def test_error_shape_mismatch(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        diffcoder.load(d)


@pytest.mark.parametrize("field,value", [("intermediate_size", -5), ("hidden_size", 0), ("num_hidden_layers", "2"),
                                         ("num_key_value_heads", 0), ("vocab_size", 12.5), ("head_dim", -1),
                                         ("max_position_embeddings", True), ("rms_norm_eps", -1e-6)])
def test_error_bad_config_sizes_name_the_file_and_field(tiny_model_dir, tmp_path, field, value):
    d = copy(tiny_model_dir, tmp_path / "s")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: {field} must be a positive (integer|number), got "):
        diffcoder.load(d)


@pytest.mark.parametrize("field,value,what", [
    ("block_length", -4, "a positive integer"), ("block_length", "4", "a positive integer"),
    ("gen_length", 0, "a positive integer"), ("steps", 2.5, "a positive integer or null"),
    ("temperature", -1, "a number >= 0"), ("threshold", 1.5, r"a number in \(0, 1\] or null"),
    ("remasking", "sometimes", "one of 'low_confidence', 'random', 'left_to_right'"), ("shift", "no", "true or false"),
    ("seed", 1.0, "an integer or null"), ("max_active_blocks", 0, "a positive integer"),
    ("block_add_threshold", 0, r"a number in \(0, 1\]"),
])
def test_error_bad_generation_config_names_the_file_and_field(tiny_model_dir, tmp_path, field, value, what):
    d = copy(tiny_model_dir, tmp_path / "g")
    gen = {"gen_length": 16, "steps": 16, "block_length": 4}
    (d / "generation_config.json").write_text(json.dumps({**gen, field: value}))
    with pytest.raises(ValueError, match=rf"generation_config\.json: '{field}' must be {what}, got "):
        diffcoder.load(d)


def test_generation_config_consistency_and_shape(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "c")
    gen = d / "generation_config.json"
    gen.write_text(json.dumps({"gen_length": 10, "block_length": 4}))
    with pytest.raises(ValueError, match=r"generation_config\.json: 'gen_length' \(10\) must be a multiple of"):
        diffcoder.load(d)
    gen.write_text(json.dumps({"gen_length": 16, "block_length": 4, "steps": 6}))
    with pytest.raises(ValueError, match=r"'steps' \(6\) must be a multiple of gen_length/block_length = 4"):
        diffcoder.load(d)
    gen.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"generation_config\.json: must hold a JSON object"):
        diffcoder.load(d)
    gen.write_text("{")
    with pytest.raises(ValueError, match=r"generation_config\.json: not valid JSON"):
        diffcoder.load(d)
    # Keys the decoder does not read pass through; null means "the decoder's default".
    gen.write_text(json.dumps({"gen_length": 16, "steps": None, "threshold": None, "bos_token_id": 1,
                               "transformers_version": "4.46.0"}))
    assert diffcoder.load(d).generation_defaults["bos_token_id"] == 1


def test_error_unsupported_architecture(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        diffcoder.load(d)


def test_remote_code_is_ignored(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "r")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["StableDiffcoderForCausalLM"],
               auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code was executed')\n")
    assert diffcoder.load(d).config.architectures == ["StableDiffcoderForCausalLM"]


def test_error_no_mask_token(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "n")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("mask_token_id")
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="mask"):
        diffcoder.load(d)


def test_mask_id_from_tokenizer(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "k")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("mask_token_id")
    (d / "config.json").write_text(json.dumps(cfg))
    model = diffcoder.load(d)
    assert model.mask_id == Tokenizer.from_dir(d).token_id("<[MASK_TOKEN]>")


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        diffcoder.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        diffcoder.load(tmp_path / "nope")


def test_tokenizer_special_ids_and_templates(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    assert None not in (tok.bos_id, tok.eos_id, tok.mask_id, tok.fim_prefix_id, tok.fim_suffix_id,
                        tok.fim_middle_id)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id and tok.eos_id in ids
    assert tok.decode(ids, skip_special_tokens=False).endswith("assistant\n")
    fim = tok.fim_prompt("a", "b")
    assert fim[0] == tok.fim_suffix_id and fim[-1] == tok.fim_middle_id


def test_infill_without_fim_tokens_is_an_error(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "f")
    model = diffcoder.load(d)
    model.tokenizer.fim_prefix_id = None
    with pytest.raises(ValueError, match="FIM"):
        diffcoder.infill(model, "def f():\n    ", "\n")


def test_fim_prompt_follows_the_models_own_order():
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"])  # Qwen2.5-Coder's spelling
    qwen = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"))
    assert qwen.fim_order == "psm"
    assert qwen.fim_prompt("a", "b") == [qwen.fim_prefix_id, 0, qwen.fim_suffix_id, 1, qwen.fim_middle_id]
    raw.add_special_tokens(["<[fim-prefix]>", "<[fim-suffix]>", "<[fim-middle]>"])  # Seed-Coder's: takes precedence
    seed = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"))
    assert seed.fim_order == "spm"
    assert seed.fim_prompt("a", "b") == [seed.fim_suffix_id, 1, seed.fim_prefix_id, 0, seed.fim_middle_id]
