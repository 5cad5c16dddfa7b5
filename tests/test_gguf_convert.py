"""GGUF import on tiny synthetic files: exact weights, tokenizer round trip, mask token, errors.

Each file is written with the `gguf` package the way llama.cpp's converter writes a Hugging Face
Llama model (q/k rows permuted into llama.cpp's rotary layout, dims listed fastest-first), from a
random `transformers` model and a freshly trained byte-level BPE tokenizer. Converting it back
must reproduce that model's logits and that tokenizer's ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from diffcoder.convert.gguf_import import DEFAULT_MASK_TOKEN, convert_gguf  # noqa: E402
from helpers import llama_cpp_permute, tiny_hf_model, train_gguf_tokenizer, vocab_of, write_gguf  # noqa: E402

SAMPLES = [
    "def add(x, y):\n    return x + y  # 12345\n",
    "  leading spaces, tabs\tand\r\nnewlines\n\n",
    "<|im_start|>user\nhi <think> there<|im_end|>\n",
    "naïve café — 日本 😀",
    "x = 45123 and 12345 + 1\n",
]


def _ids(n: int = 24, vocab: int = 300, seed: int = 1) -> Any:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def _hf_load(path: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# --------------------------------------------------------------------------- weights
@pytest.mark.parametrize("tied", [True, False])
def test_f32_roundtrip_reproduces_logits(tmp_path: Path, reference_tokenizer: Any, tied: bool) -> None:
    import diffcoder

    src = write_gguf(tmp_path / "m.gguf", reference_tokenizer, tied=tied)
    rep = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] == 2 and cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert rep.mask_added and rep.row_added and cfg["mask_token_id"] == rep.vocab_size - 1
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["block_length"] == 1 and gen["shift"] is True  # an AR model: decode it AR-style
    ids = _ids()
    with torch.no_grad():
        want = src(ids).logits
        hf = _hf_load(tmp_path / "out")(ids).logits[..., : want.shape[-1]]
        ours = diffcoder.load(tmp_path / "out", dtype="float32")(ids, attn_mask="causal")[..., : want.shape[-1]]
    assert (hf - want).abs().max().item() < 1e-4
    assert (ours - want).abs().max().item() < 1e-4
    assert want.abs().max().item() > 1.0  # the comparison is not between near-zero tensors


def test_unpermute_is_needed_and_exact(tmp_path: Path, reference_tokenizer: Any) -> None:
    """q/k rows come back to the HF order exactly (a missing un-permute would change them)."""
    from safetensors.torch import load_file

    src = write_gguf(tmp_path / "m.gguf", reference_tokenizer)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"
        want = src.state_dict()[name]
        assert torch.equal(got[name], want)
        heads = 4 if proj == "q_proj" else 2
        permuted = torch.from_numpy(llama_cpp_permute(want.numpy(), heads))
        assert not torch.equal(permuted, want)


def test_q8_0_dequantised_exactly_and_close_to_source(tmp_path: Path, reference_tokenizer: Any) -> None:
    from safetensors.torch import load_file

    q8 = gguf.GGMLQuantizationType.Q8_0
    src = write_gguf(tmp_path / "m.gguf", reference_tokenizer, qtype=q8)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    v = src.state_dict()["model.layers.0.self_attn.v_proj.weight"].numpy()
    exact = gguf.quants.dequantize(gguf.quants.quantize(v, q8), q8)
    assert np.array_equal(got["model.layers.0.self_attn.v_proj.weight"].numpy(), exact)
    ids = _ids()
    with torch.no_grad():
        want = src(ids).logits
        have = _hf_load(tmp_path / "out")(ids).logits[..., : want.shape[-1]]
    rel = ((have - want).norm() / want.norm()).item()
    assert 0 < rel < 0.05  # quantised, so not identical, but close


def test_bfloat16_output(tmp_path: Path, reference_tokenizer: Any) -> None:
    from safetensors.torch import load_file

    src = write_gguf(tmp_path / "m.gguf", reference_tokenizer)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="bfloat16")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], src.state_dict()[name].to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_output_loads(tmp_path: Path, reference_tokenizer: Any) -> None:
    import diffcoder

    src = write_gguf(tmp_path / "m.gguf", reference_tokenizer, tied=False)
    rep = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert rep.n_files == len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not list((tmp_path / "out").glob("shard-*"))
    ids = _ids()
    with torch.no_grad():
        want = src(ids).logits
        ours = diffcoder.load(tmp_path / "out", dtype="float32")(ids, attn_mask="causal")[..., : want.shape[-1]]
        hf = _hf_load(tmp_path / "out")(ids).logits[..., : want.shape[-1]]
    assert (ours - want).abs().max().item() < 1e-4 and (hf - want).abs().max().item() < 1e-4


def test_qwen2_with_biases_reproduces_logits(tmp_path: Path, reference_tokenizer: Any) -> None:
    """Qwen2 GGUFs keep the HF q/k row order (llama.cpp runs them with NeoX rope) and add biases."""
    import diffcoder

    src = write_gguf(tmp_path / "m.gguf", reference_tokenizer, arch="qwen2", pre="qwen2", tied=False)
    assert src.model.layers[0].self_attn.q_proj.bias.abs().max().item() > 0.1  # biases matter here
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    ids = _ids()
    with torch.no_grad():
        want = src(ids).logits
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
        got_hf = hf(ids).logits[..., : want.shape[-1]]
        ours = diffcoder.load(tmp_path / "out", dtype="float32")(ids, attn_mask="causal")[..., : want.shape[-1]]
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    assert (got_hf - want).abs().max().item() < 1e-4 and (ours - want).abs().max().item() < 1e-4


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 128}


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, LLAMA3_SCALING],
                         ids=["linear", "llama3"])
def test_rope_scaling_is_carried_over(tmp_path: Path, reference_tokenizer: Any, scaling: dict) -> None:
    import diffcoder

    src = write_gguf(tmp_path / "m.gguf", reference_tokenizer, rope_scaling=scaling)
    rep = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    assert rep.hparams.rope_scaling == pytest.approx(scaling)
    ids = _ids(n=64)
    plain = tiny_hf_model(src.config.vocab_size, True)  # same weights, no scaling
    with torch.no_grad():
        want = src(ids).logits
        ours = diffcoder.load(tmp_path / "out", dtype="float32")(ids, attn_mask="causal")[..., : want.shape[-1]]
        hf = _hf_load(tmp_path / "out")(ids).logits[..., : want.shape[-1]]
        unscaled = plain(ids).logits
    assert (ours - want).abs().max().item() < 1e-4 and (hf - want).abs().max().item() < 1e-4
    assert (unscaled - want).abs().max().item() > 0.1  # the scaling mattered


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path: Path, reference_tokenizer: Any) -> None:
    odd = ("rope_freqs.weight", np.linspace(1.0, 3.0, 8).astype(np.float32), None)
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, extra_tensor=odd)
    _assert_fails(tmp_path, "rope_freqs tensor does not match Llama-3")


# --------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("pre", ["smollm", "llama-bpe"])
def test_tokenizer_matches_reference_and_names_specials(tmp_path: Path, pre: str) -> None:
    import diffcoder
    from transformers import AutoTokenizer

    reference_tokenizer = train_gguf_tokenizer(pre)
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, pre=pre)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    for text in SAMPLES:
        want = reference_tokenizer.encode(text).ids
        assert hf.encode(text, add_special_tokens=False) == want, text
        assert hf.decode(want) == text
    digits = hf.convert_ids_to_tokens(hf.encode("x = 12345", add_special_tokens=False))
    assert digits[-5:] == list("12345") if pre == "smollm" else digits[-2:] == ["123", "45"]
    if pre == "smollm":  # the hand-made merge is never used: digits are split off first
        assert hf.convert_ids_to_tokens(hf.encode(" 1", add_special_tokens=False)) == ["\u0120", "1"]
    tok = diffcoder.load(tmp_path / "out", dtype="float32").tokenizer
    assert tok.bos_id == hf.convert_tokens_to_ids("<|im_start|>") and tok.eos_id == hf.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(chat, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.mask_id == hf.convert_tokens_to_ids(DEFAULT_MASK_TOKEN) == tok.vocab_size - 1
    assert tok.decode(chat) == "user\nhi\nassistant\n"  # control tokens are special


# --------------------------------------------------------------------------- mask token
def test_existing_mask_token_is_reused(tmp_path: Path, reference_tokenizer: Any) -> None:
    import diffcoder

    write_gguf(tmp_path / "m.gguf", reference_tokenizer, extra_tokens=(DEFAULT_MASK_TOKEN,))
    rep = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    n_tokens = len(vocab_of(reference_tokenizer)[0]) + 1
    assert not rep.mask_added and not rep.row_added and rep.vocab_size == n_tokens
    assert rep.mask_id == n_tokens - 1
    model = diffcoder.load(tmp_path / "out", dtype="float32")
    assert model.mask_id == model.tokenizer.mask_id == rep.mask_id
    assert "shift" not in model.generation_defaults  # a diffusion port keeps block decoding


def test_mask_takes_a_padding_row_when_there_is_one(tmp_path: Path, reference_tokenizer: Any) -> None:
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, pad_rows=3)
    rep = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", mask_token="<mask>")
    n_tokens = len(vocab_of(reference_tokenizer)[0])
    assert rep.mask_added and not rep.row_added
    assert (rep.mask_id, rep.vocab_size, rep.mask_token) == (n_tokens, n_tokens + 3, "<mask>")


def test_appended_mask_row_is_the_mean_embedding(tmp_path: Path, reference_tokenizer: Any) -> None:
    from safetensors.torch import load_file

    src = write_gguf(tmp_path / "m.gguf", reference_tokenizer, tied=False)
    rep = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = src.state_dict()[name]
        assert got[name].shape[0] == w.shape[0] + 1 == rep.vocab_size
        assert torch.allclose(got[name][-1], w.mean(0), atol=1e-6)


# --------------------------------------------------------------------------- errors
def _assert_fails(tmp_path: Path, match: str, **kwargs: Any) -> None:
    with pytest.raises(ValueError, match=match):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", **kwargs)
    # nothing half-written is left behind
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_unsupported_architecture_is_named(tmp_path: Path, reference_tokenizer: Any) -> None:
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, arch="falcon")
    _assert_fails(tmp_path, "unsupported GGUF architecture 'falcon'")


def test_unsupported_quant_type_is_named(tmp_path: Path, reference_tokenizer: Any) -> None:
    # Q8_K has no dequantiser in the gguf package; one block = 256 values = 292 bytes.
    q8k = gguf.GGMLQuantizationType.Q8_K
    _, nbytes = gguf.GGML_QUANT_SIZES[q8k]
    raw = np.zeros((64, nbytes), dtype=np.uint8)
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, extra_tensor=("blk.0.ffn_up.weight", raw, q8k),
               drop_tensor="blk.0.ffn_up.weight")
    _assert_fails(tmp_path, "unsupported GGUF quant type Q8_K")


def test_unknown_tensor_is_named(tmp_path: Path, reference_tokenizer: Any) -> None:
    extra = ("blk.0.attn_q.bias", np.zeros(64, dtype=np.float32), None)
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, extra_tensor=extra)
    _assert_fails(tmp_path, "'blk.0.attn_q.bias' has no place")


def test_missing_tensor_is_reported(tmp_path: Path, reference_tokenizer: Any) -> None:
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, drop_tensor="blk.1.ffn_down.weight")
    _assert_fails(tmp_path, "lacks 1 tensors.*layers.1.mlp.down_proj")


@pytest.mark.parametrize("kwargs,match", [
    ({"tokenizer_model": "llama"}, "tokenizer model 'llama' is not supported"),
    ({"pre": "made-up"}, "pre-tokenizer 'made-up' is not supported"),
])
def test_unsupported_tokenizer_is_named(tmp_path: Path, reference_tokenizer: Any, kwargs: dict, match: str) -> None:
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, **kwargs)
    _assert_fails(tmp_path, match)


def test_bad_inputs(tmp_path: Path, reference_tokenizer: Any) -> None:
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    _assert_fails(tmp_path, "not a GGUF file")
    write_gguf(tmp_path / "m.gguf", reference_tokenizer)
    _assert_fails(tmp_path, "unsupported dtype 'int8'", dtype="int8")


def test_existing_output_needs_force(tmp_path: Path, reference_tokenizer: Any) -> None:
    write_gguf(tmp_path / "m.gguf", reference_tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="pass --force"):
        convert_gguf(tmp_path / "m.gguf", out)
    assert (out / "keep.txt").read_text() == "precious"
    convert_gguf(tmp_path / "m.gguf", out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]


# --------------------------------------------------------------------------- CLI
def test_cli_converts_and_reports(tmp_path: Path, reference_tokenizer: Any, capsys: Any) -> None:
    from diffcoder.cli import main

    write_gguf(tmp_path / "m.gguf", reference_tokenizer)
    rc = main(["convert", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out"),
               "--dtype", "float32", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "tied embeddings" in out and f"{DEFAULT_MASK_TOKEN!r} appended" in out
    rc = main(["convert", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("diffcoder convert: error:") and "--force" in err[-1]
    # with the progress bar, replacing the folder
    rc = main(["convert", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out"), "--force",
               "--dtype", "bfloat16"])
    assert rc == 0 and "bfloat16" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
