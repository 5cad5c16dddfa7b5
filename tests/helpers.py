"""Shared test helpers (no test module imports another): tiny models, the release-rule oracle,
a GGUF writer shaped like llama.cpp's converter, and the trainer's CLI/metrics helpers.

The oracle is a slow, obviously-correct re-statement of the published decoder's rules, on
`transformers`. No cache: every step recomputes the whole prefix with the block-causal mask (which
is what the release's cache holds, since earlier blocks never see later ones). Batch size 1. It
follows docs/decoding.md rule by rule, with the two fixes listed there (never choose the mask
token; with a threshold keep stepping until the block is decoded).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from diffcoder.config import ModelConfig
from diffcoder.masks import block_causal_mask
from diffcoder.model import DiffCoderLM

# ----------------------------------------------------------------- tiny models
V, MASK, EOS = 61, 5, 2


def decode_model(seed=0, std=0.6, **kw) -> DiffCoderLM:
    cfg = ModelConfig(**{**dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                mask_token_id=MASK), **kw})
    return DiffCoderLM(cfg).init_weights(seed, std=std).double().eval()


def llama_model(seed=0, **kw) -> DiffCoderLM:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    return DiffCoderLM(ModelConfig(**{**base, **kw})).init_weights(seed, std=0.1).eval()


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.choice([t for t in range(V) if t not in (MASK, EOS)]) for _ in range(n)]


def cases(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        B = [1, 2, 4, 8][i % 4]
        G = B * rng.randint(1, max(1, 16 // B))
        n_blocks = G // B
        s = rng.choice([1, 2, B, 2 * B])
        out.append(dict(prompt=rand_prompt(rng, rng.randint(1, 13)), block_length=B, gen_length=G,
                        steps=n_blocks * s, threshold=rng.choice([None, None, 0.3, 0.7, 0.95]),
                        shift=rng.random() < 0.3, eos_id=rng.choice([None, EOS])))
    return out


# ----------------------------------------------------------------- the release-rule oracle
def hf_twin(model, dtype=torch.float64):
    """A transformers.LlamaForCausalLM holding the same weights as our model."""
    import transformers

    cfg = dict(model.config.to_dict())
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.to(dtype).eval()


def release_schedule(m: int, s: int) -> list[int]:
    return [m // s + (1 if j < m % s else 0) for j in range(s)]


@torch.no_grad()
def oracle_generate(hf, prompt, *, steps, gen_length, block_length, mask_id, threshold=None, shift=False,
                    eos_id=None, left_to_right=False):
    B, P, G = block_length, len(prompt), gen_length
    x = torch.tensor([list(prompt) + [mask_id] * G])
    s = steps // (G // B)
    nfe = 1  # the release prefills the prompt's full blocks once
    for bs in range((P // B) * B, P + G, B):
        be = min(bs + B, P + G)
        m = int((x[0, bs:be] == mask_id).sum())
        schedule = [k for k in release_schedule(m, s) if k > 0]
        j = 0
        while bool((x[0, bs:be] == mask_id).any()):
            mask4 = block_causal_mask(be, B)[None, None]
            logits = hf(x[:, :be], attention_mask=mask4).logits[0].double()
            if shift:
                block_logits = torch.cat([logits[bs - 1:bs] if bs > 0 else torch.zeros_like(logits[:1]),
                                          logits[bs:be - 1]])
            else:
                block_logits = logits[bs:be]
            is_mask = x[0, bs:be] == mask_id
            choice = block_logits.clone()
            choice[:, mask_id] = float("-inf")
            x0 = choice.argmax(-1)
            conf = torch.softmax(block_logits, -1).gather(-1, x0[:, None])[:, 0]
            conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
            if left_to_right:  # our extension: by place, not confidence
                places = [i for i in range(be - bs) if is_mask[i]]
                if threshold is None:
                    picked = places[:schedule[j]]
                else:
                    picked = places[:1]
                    for i in places[1:]:
                        if i != picked[-1] + 1 or conf[i] < threshold:
                            break
                        picked.append(i)
            elif threshold is None:
                picked = torch.topk(conf, schedule[j]).indices.tolist()
            else:
                order = torch.topk(conf, int(is_mask.sum())).indices.tolist()
                picked = [order[0]] + [i for i in order[1:] if conf[i] >= threshold]
            for i in picked:
                x[0, bs + i] = x0[i]
            j += 1
            nfe += 1
        nfe += 1  # the release's separate commit pass
        gen = x[0, max(bs, P):be].tolist()
        if eos_id is not None and eos_id in gen:
            out = x[0, P:be].tolist()
            return out[:out.index(eos_id) + 1], nfe
    return x[0, P:].tolist(), nfe


# ----------------------------------------------------------------- trainer runs
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
REPO = Path(__file__).resolve().parent.parent


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(recs: list[dict]) -> list[dict]:
    from diffcoder.train.trainer import TIMING_FIELDS  # only the trainer's tests need the trainer

    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in recs]


def cli(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "diffcoder.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
                          timeout=300)


# ----------------------------------------------------------------- GGUF files as llama.cpp writes them
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


def train_gguf_tokenizer(pre: str = "smollm") -> Any:
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


def vocab_of(tok: Any) -> tuple[list[str], list[str], list[int]]:
    """(tokens by id, merges as 'a b', llama.cpp token types) of a trained tokenizer."""
    data = json.loads(tok.to_str())
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    return tokens, merges, types


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(p: dict, head_dim: int) -> np.ndarray:
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


def tiny_hf_model(vocab_size: int, tied: bool, seed: int = 0, arch: str = "llama",
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
    tokens, merges, types = vocab_of(tok)
    tokens, types = tokens + list(extra_tokens), types + [3] * len(extra_tokens)
    model = tiny_hf_model(len(tokens) + pad_rows, tied, arch=arch, rope_scaling=rope_scaling)
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
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(rope_scaling, cfg.hidden_size // 4))
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
    for name, arr, raw in gguf_tensors(model, qtype, permute_qk=arch != "qwen2"):
        if name != drop_tensor:
            w.add_tensor(name, arr, raw_dtype=raw)
    if extra_tensor is not None:
        w.add_tensor(extra_tensor[0], extra_tensor[1], raw_dtype=extra_tensor[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def gguf_tensors(model: Any, qtype: Any, permute_qk: bool = True) -> list[tuple[str, np.ndarray, Any]]:
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
                arr = llama_cpp_permute(arr, cfg.num_attention_heads)
            elif permute_qk and gg == "attn_k":
                arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
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
