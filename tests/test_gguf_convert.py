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

ROPE_THETA = 10000.0
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "import os\nprint(os.path.join('a', 'b'))  # 2024 paths\n",
    "x = 123 + 456 * 123 - 45\n",
    "The quick brown fox jumps over the lazy dog. Héllo wörld!\n",
] * 4
SAMPLES = [
    "def add(x, y):\n    return x + y  # 12345\n",
    "  leading spaces, tabs\tand\r\nnewlines\n\n",
    "<|im_start|>user\nhi <think> there<|im_end|>\n",
    "naïve café — 日本 😀",
    "x = 45123 and 12345 + 1\n",
]


# --------------------------------------------------------------------------- fixtures
def _train_tokenizer(pre: str = "smollm") -> Any:
    """A tiny tokenizer shaped like the real ones of that GGUF pre-tokenizer name.

    smollm: digits split one by one, then GPT-2 byte-level BPE (SmolLM2's tokenizer.json). A
    merge 'Ġ 1' is added by hand: GPT-2 splitting alone would use it on " 1", SmolLM's never does,
    so the test notices a wrong pre-tokenizer. llama-bpe: Llama-3's regex (digits in threes).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=380, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if pre == "smollm":
        data = json.loads(tok.to_str())
        data["model"]["vocab"]["\u01201"] = len(data["model"]["vocab"])
        data["model"]["merges"].append(["\u0120", "1"])
        tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens([USER_DEFINED])
    return tok


@pytest.fixture(scope="module")
def reference_tokenizer() -> Any:
    return _train_tokenizer()


def _vocab_of(tok: Any) -> tuple[list[str], list[str], list[int]]:
    """(tokens by id, merges as 'a b', llama.cpp token types) of a trained tokenizer."""
    data = json.loads(tok.to_str())
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    return tokens, merges, types


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_cpp_rope_freqs(p: dict, head_dim: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's rope_freqs for Llama-3 scaling, one frequency at a time."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / ROPE_THETA ** (i / head_dim)
        wavelen = 2 * np.pi / freq
        if wavelen < p["original_max_position_embeddings"] / p["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > p["original_max_position_embeddings"] / p["low_freq_factor"]:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def _tiny_hf_model(vocab_size: int, tied: bool, seed: int = 0, arch: str = "llama",
                   rope_scaling: dict | None = None) -> Any:
    import transformers

    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }.get(arch, (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    cfg = config_cls(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=ROPE_THETA, tie_word_embeddings=tied,
    )
    if rope_scaling:
        cfg.rope_parameters = {**rope_scaling, "rope_theta": ROPE_THETA}
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # weights large enough that a wrong permutation shows in the logits
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


def write_gguf(
    path: Path,
    tok: Any,
    *,
    tied: bool = True,
    qtype: Any = None,
    arch: str = "llama",
    pre: str = "smollm",
    tokenizer_model: str = "gpt2",
    extra_tokens: tuple[str, ...] = (),
    pad_rows: int = 0,
    extra_tensor: tuple[str, np.ndarray, Any] | None = None,
    drop_tensor: str | None = None,
    rope_scaling: dict | None = None,
) -> Any:
    """Write a tiny Llama GGUF the way llama.cpp would; returns the `transformers` model it holds."""
    tokens, merges, types = _vocab_of(tok)
    tokens, types = tokens + list(extra_tokens), types + [3] * len(extra_tokens)
    model = _tiny_hf_model(len(tokens) + pad_rows, tied, arch=arch, rope_scaling=rope_scaling)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if rope_scaling and rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling["factor"])
    elif rope_scaling:  # llama3: llama.cpp writes only the per-frequency divisors
        w.add_rope_scaling_orig_ctx_len(rope_scaling["original_max_position_embeddings"])
        w.add_tensor("rope_freqs.weight", _llama_cpp_rope_freqs(rope_scaling, cfg.hidden_size // 4))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, arr, raw in _gguf_tensors(model, qtype, permute_qk=arch != "qwen2"):
        if name != drop_tensor:
            w.add_tensor(name, arr, raw_dtype=raw)
    if extra_tensor is not None:
        w.add_tensor(extra_tensor[0], extra_tensor[1], raw_dtype=extra_tensor[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _gguf_tensors(model: Any, qtype: Any, permute_qk: bool = True) -> list[tuple[str, np.ndarray, Any]]:
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    out = [("token_embd.weight", sd["model.embed_tokens.weight"]), ("output_norm.weight", sd["model.norm.weight"])]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            arr = sd[f"model.layers.{i}.{hf}.weight"]
            if permute_qk and gg == "attn_q":
                arr = _llama_cpp_permute(arr, cfg.num_attention_heads)
            elif permute_qk and gg == "attn_k":
                arr = _llama_cpp_permute(arr, cfg.num_key_value_heads)
            out.append((f"blk.{i}.{gg}.weight", arr))
            if f"model.layers.{i}.{hf}.bias" in sd:  # Qwen2's q/k/v biases (llama.cpp leaves them as is)
                out.append((f"blk.{i}.{gg}.bias", sd[f"model.layers.{i}.{hf}.bias"]))
    result = []
    for name, arr in out:
        if qtype is not None and arr.ndim == 2:
            result.append((name, gguf.quants.quantize(arr, qtype), qtype))
        else:
            result.append((name, arr, None))
    return result


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
        permuted = torch.from_numpy(_llama_cpp_permute(want.numpy(), heads))
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
    plain = _tiny_hf_model(src.config.vocab_size, True)  # same weights, no scaling
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

    reference_tokenizer = _train_tokenizer(pre)
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
    n_tokens = len(_vocab_of(reference_tokenizer)[0]) + 1
    assert not rep.mask_added and not rep.row_added and rep.vocab_size == n_tokens
    assert rep.mask_id == n_tokens - 1
    model = diffcoder.load(tmp_path / "out", dtype="float32")
    assert model.mask_id == model.tokenizer.mask_id == rep.mask_id
    assert "shift" not in model.generation_defaults  # a diffusion port keeps block decoding


def test_mask_takes_a_padding_row_when_there_is_one(tmp_path: Path, reference_tokenizer: Any) -> None:
    write_gguf(tmp_path / "m.gguf", reference_tokenizer, pad_rows=3)
    rep = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", mask_token="<mask>")
    n_tokens = len(_vocab_of(reference_tokenizer)[0])
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
