"""Read a Llama-family GGUF file (llama, qwen2) in Hugging Face terms: hyper-parameters, rope
scaling, vocabulary, and the weights under their Hugging Face names, dequantised by the `gguf`
package, with the q/k row permutation llama.cpp applies for its LLaMA rotary layout undone (Qwen2
files are not permuted: llama.cpp runs them with NeoX-style rope)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from diffcoder.convert.gguf_tokenizer import GGUFVocab


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture maps onto a Hugging Face class."""

    hf_architecture: str
    config_class: str  # the transformers config class that writes config.json
    permute_qk: bool  # llama.cpp permutes q/k rows only for its LLaMA rope layout, not Qwen2's (NeoX)
    qkv_bias: bool  # Qwen2 has biases on q, k and v


ARCHITECTURES = {
    "llama": ArchSpec("LlamaForCausalLM", "LlamaConfig", permute_qk=True, qkv_bias=False),
    "qwen2": ArchSpec("Qwen2ForCausalLM", "Qwen2Config", permute_qk=False, qkv_bias=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

_MISSING = object()
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BIAS_TENSORS = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # derived data (Llama-3 rope scaling), becomes config, not a weight
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass
class LlamaHParams:
    """The hyper-parameters of a Llama-family GGUF, in Hugging Face terms."""

    arch: str  # a key of ARCHITECTURES
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    max_positions: int
    rope_scaling: dict[str, Any] | None  # Hugging Face rope_scaling ("linear" or "llama3"), None = plain
    vocab_rows: int  # rows of token_embd (may exceed the tokenizer's vocabulary: padding)
    tied: bool


class _Meta:
    """Typed access to GGUF key/value metadata with errors that name the missing key."""

    def __init__(self, reader: Any) -> None:
        self.fields = reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.fields.get(key)
        if field is None or not field.types:
            if default is _MISSING:
                raise ValueError(f"the GGUF file lacks the metadata key {key!r}")
            return default
        return field.contents()


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """`gguf.GGUFReader` for `path`, with a one-line error for a missing or non-GGUF file."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such GGUF file: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{p} is not a GGUF file (it does not start with the 'GGUF' magic bytes)")
    try:
        return gguf.GGUFReader(p)
    except (ValueError, OSError) as exc:  # truncated or corrupt header
        raise ValueError(f"cannot read GGUF file {p}: {exc}") from exc


def read_hparams(reader: Any) -> LlamaHParams:
    """The Llama hyper-parameters, after checking the architecture is one we can convert."""
    meta = _Meta(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}: only {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama-family decoders) can be converted"
        )
    if meta.get(f"{arch}.expert_count", 0):
        raise ValueError("mixture-of-experts GGUF models are not supported (expert_count > 0)")
    names = {t.name: t for t in reader.tensors}
    hidden = int(meta.get(f"{arch}.embedding_length"))
    n_heads = int(meta.get(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
    rot_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dim {rot_dim} < head dim {head_dim}) are not supported")
    if "token_embd.weight" not in names:
        raise ValueError("the GGUF file has no token_embd.weight tensor")
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    return LlamaHParams(
        arch=arch,
        n_layers=int(meta.get(f"{arch}.block_count")),
        hidden=hidden,
        intermediate=int(meta.get(f"{arch}.feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=read_rope_scaling(meta, arch, names.get(ROPE_FREQS), head_dim, theta),
        rms_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_positions=int(meta.get(f"{arch}.context_length", 2048)),
        vocab_rows=int(names["token_embd.weight"].shape[-1]),
        tied="output.weight" not in names,
    )


def read_rope_scaling(meta: _Meta, arch: str, freqs: Any, head_dim: int, theta: float) -> dict[str, Any] | None:
    """The Hugging Face `rope_scaling` of the file: none, linear, or Llama-3's (rebuilt from rope_freqs).

    llama.cpp stores Llama-3.1-style scaling only as a `rope_freqs` tensor of per-frequency divisors.
    We recover the four parameters by taking the factor from the tensor and checking that Llama-3's
    published constants reproduce every divisor; anything else is refused rather than guessed.
    """
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear" and freqs is None:
        return {"rope_type": "linear", "factor": float(meta.get(f"{arch}.rope.scaling.factor"))}
    if kind != "none":
        raise ValueError(f"unsupported rope scaling {kind!r}: only none, linear and Llama-3 scaling are supported")
    if freqs is None:
        return None
    divisors = dequantized(freqs).reshape(-1).astype(np.float64)
    params = {
        "rope_type": "llama3",
        "factor": float(divisors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192)),
    }
    if divisors.shape[0] != head_dim // 2 or not np.allclose(llama3_rope_divisors(params, head_dim, theta), divisors,
                                                           rtol=1e-5):
        raise ValueError("unsupported rope scaling: the rope_freqs tensor does not match Llama-3's scaling rule")
    return params


def llama3_rope_divisors(p: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp writes as rope_freqs for Llama-3 scaling parameters `p`."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * np.pi / inv.astype(np.float64)
    old, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                              p["factor"])
    smooth = (old / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, medium))


def read_vocab(reader: Any) -> GGUFVocab:
    """The tokenizer metadata as a `GGUFVocab`."""
    meta = _Meta(reader)
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "unknown", "padding")}
    return GGUFVocab(
        model=meta.get("tokenizer.ggml.model"),
        pre=meta.get("tokenizer.ggml.pre", "default"),
        tokens=list(meta.get("tokenizer.ggml.tokens")),
        token_types=[int(t) for t in meta.get("tokenizer.ggml.token_type", [])],
        merges=list(meta.get("tokenizer.ggml.merges", [])),
        bos_id=_opt_int(ids["bos"]),
        eos_id=_opt_int(ids["eos"]),
        unk_id=_opt_int(ids["unknown"]),
        pad_id=_opt_int(ids["padding"]),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template", None),
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _layer_tensors(hp: LlamaHParams) -> dict[str, str]:
    return {**_LAYER_TENSORS, **(_BIAS_TENSORS if ARCHITECTURES[hp.arch].qkv_bias else {})}


def hf_name(gguf_name: str, hp: LlamaHParams) -> str:
    """The Hugging Face parameter name of a GGUF tensor; ValueError for anything else."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_NAME.match(gguf_name)
    layer_tensors = _layer_tensors(hp)
    if m and m.group(2) in layer_tensors and int(m.group(1)) < hp.n_layers:
        return f"model.layers.{m.group(1)}.{layer_tensors[m.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a plain Llama checkpoint (unsupported variant)")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's converter reorders each head's output rows from the Hugging Face "rotate half"
    layout (first half of the head's dims, then second half) to interleaved pairs:
    reshape(n_heads, 2, d/2, in).swapaxes(1, 2). This is its exact inverse.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute a q/k weight of {rows} rows over {n_heads} heads")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_quant_types(reader: Any) -> None:
    """ValueError naming the first tensor whose quant type the gguf package cannot dequantise."""
    import gguf
    from gguf.quants import dequantize

    checked: dict[Any, bool] = {}
    for t in reader.tensors:
        qtype = t.tensor_type
        if qtype not in checked:
            _, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
            try:  # one zero block tells whether this type has a dequantiser
                dequantize(np.zeros((1, type_bytes), dtype=np.uint8), qtype)
                checked[qtype] = True
            except (NotImplementedError, ValueError, TypeError):
                checked[qtype] = False
        if not checked[qtype]:
            raise ValueError(f"unsupported GGUF quant type {qtype.name} (tensor {t.name!r}): cannot dequantise it")


def dequantized(t: Any) -> np.ndarray:
    """The float32 values of a GGUF tensor, in row-major [out, in] (torch Linear) order."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def iter_state_dict(reader: Any, hp: LlamaHParams) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, float32 array) for every tensor, q/k rows restored to the HF layout."""
    permute = ARCHITECTURES[hp.arch].permute_qk
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = hf_name(t.name, hp)
        w = dequantized(t)
        if permute and t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, hp.n_heads)
        elif permute and t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, hp.n_kv_heads)
        yield name, w


def check_tensor_names(reader: Any, hp: LlamaHParams) -> None:
    """ValueError for a tensor we have no place for, or a missing one, before any dequantising."""
    missing = expected_names(hp) - {hf_name(t.name, hp) for t in reader.tensors if t.name != ROPE_FREQS}
    if missing:
        raise ValueError(f"the GGUF file lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")


def expected_names(hp: LlamaHParams) -> set[str]:
    """The HF parameter names a complete checkpoint of these hyper-parameters has."""
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if hp.tied else {"lm_head.weight"})
    for i in range(hp.n_layers):
        names |= {f"model.layers.{i}.{v}" for v in _layer_tensors(hp).values()}
    return names
