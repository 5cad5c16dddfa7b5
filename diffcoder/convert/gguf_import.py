"""GGUF (llama.cpp) -> Hugging Face-layout checkpoint for Llama-family models (llama, qwen2).

The `gguf` package parses the file and dequantises every common quant type; what is ours is the
mapping back to the Hugging Face layout:
- tensor names (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...);
- the q/k row permutation llama.cpp applies for its LLaMA rotary layout (undone here; Qwen2
  files are not permuted, llama.cpp runs them with NeoX-style rope, and carry q/k/v biases);
- config.json from the `<arch>.*` hyper-parameters (tied embeddings when there is no `output`,
  rope scaling rebuilt from metadata or from the `rope_freqs` tensor);
- the tokenizer from the `tokenizer.*` metadata (see gguf_tokenizer.py);
- a mask token, which an autoregressive model lacks and `diffcoder.load` requires.

Everything is written into a temporary sibling folder and moved into place at the end, so a
failed or interrupted conversion never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from diffcoder.convert.gguf_tokenizer import GGUFVocab, check_supported, save_tokenizer

DEFAULT_MASK_TOKEN = "<[MASK_TOKEN]>"  # the spelling Stable-DiffCoder's tokenizer uses


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
DTYPES = ("bfloat16", "float32")
DEFAULT_MAX_SHARD_BYTES = 4 << 30

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
# PretrainedConfig bookkeeping that says nothing about a causal LM; left out of config.json.
_GENERIC_CONFIG_KEYS = {
    "_name_or_path", "id2label", "label2id", "problem_type", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
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


@dataclass
class ConversionReport:
    """What `convert_gguf` wrote, for the CLI summary and the tests."""

    out_dir: Path
    hparams: LlamaHParams
    dtype: str
    mask_token: str
    mask_id: int
    mask_added: bool  # the mask token was appended to the tokenizer (the GGUF had none)
    row_added: bool  # ... and token_embd (and output) got one new row for it
    vocab_size: int
    n_files: int
    n_bytes: int


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


def resolve_mask(vocab: GGUFVocab, hp: LlamaHParams, mask_token: str | None) -> tuple[str, int, bool]:
    """(mask token, its id, whether an embedding row must be appended for it).

    An existing token of that spelling is reused (a diffusion port already has one). Otherwise
    the token is appended: it takes the first embedding row past the tokenizer's vocabulary,
    reusing a padding row if token_embd has spare rows, else one new row.
    """
    token = mask_token or DEFAULT_MASK_TOKEN
    if token in vocab.tokens:
        return token, vocab.tokens.index(token), False
    new_id = len(vocab.tokens)
    return token, new_id, new_id >= hp.vocab_rows


def hf_config(hp: LlamaHParams, vocab: GGUFVocab, mask_id: int, vocab_size: int, dtype: str) -> dict[str, Any]:
    """config.json contents, built with transformers' own config class so every key is canonical."""
    import transformers

    spec = ARCHITECTURES[hp.arch]
    cfg = getattr(transformers, spec.config_class)(
        vocab_size=vocab_size,
        hidden_size=hp.hidden,
        intermediate_size=hp.intermediate,
        num_hidden_layers=hp.n_layers,
        num_attention_heads=hp.n_heads,
        num_key_value_heads=hp.n_kv_heads,
        head_dim=hp.head_dim,
        max_position_embeddings=hp.max_positions,
        rms_norm_eps=hp.rms_eps,
        rope_theta=hp.rope_theta,
        rope_scaling=dict(hp.rope_scaling) if hp.rope_scaling else None,  # transformers edits it in place
        tie_word_embeddings=hp.tied,
        hidden_act="silu",
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id,
        architectures=[spec.hf_architecture],
        dtype=dtype,
    )
    d = {k: v for k, v in cfg.to_dict().items() if k not in _GENERIC_CONFIG_KEYS}
    d["rope_theta"] = hp.rope_theta  # transformers 4.x spelling, next to 5.x's rope_parameters
    d["torch_dtype"] = dtype  # 4.x spelling of `dtype`, which diffcoder.load reads as its default
    d["mask_token_id"] = mask_id  # read by diffcoder.load; transformers keeps it as an attribute
    return d


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    mask_token: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int, str], None] | None = None,
) -> ConversionReport:
    """Convert a Llama-family GGUF file into a Hugging Face-layout checkpoint folder.

    `progress(done, total, tensor_name)` is called after each tensor is dequantised.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} already exists and is not empty; pass --force to replace it")
    reader = open_gguf(gguf_path)
    hp = read_hparams(reader)
    vocab = read_vocab(reader)
    check_supported(vocab)  # fail on the tokenizer before spending minutes on the weights
    check_quant_types(reader)
    check_tensor_names(reader, hp)
    if len(vocab.tokens) > hp.vocab_rows:
        raise ValueError(f"the tokenizer has {len(vocab.tokens)} tokens but token_embd only {hp.vocab_rows} rows")
    token, mask_id, append_row = resolve_mask(vocab, hp, mask_token)
    mask_added = mask_id == len(vocab.tokens)
    if mask_added:
        vocab.extra_special.append(token)
    vocab_size = hp.vocab_rows + (1 if append_row else 0)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        n_files, n_bytes = _write_weights(reader, hp, tmp, dtype, append_row, max_shard_bytes, progress)
        save_tokenizer(vocab, tmp, model_max_length=hp.max_positions)
        _write_json(tmp / "config.json", hf_config(hp, vocab, mask_id, vocab_size, dtype))
        _write_json(tmp / "generation_config.json", _generation_config(vocab, autoregressive=mask_added))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionReport(out, hp, dtype, token, mask_id, mask_added, append_row, vocab_size, n_files, n_bytes)


def _generation_config(vocab: GGUFVocab, autoregressive: bool) -> dict[str, Any]:
    """Special ids, plus diffcoder's decoding defaults for a model that had no mask token.

    Such a model was trained autoregressively: diffcoder can only run it one token per block with
    shifted logits (`diffcoder chat` reads these keys when no flag overrides them).
    """
    cfg: dict[str, Any] = {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id}
    if autoregressive:
        cfg.update(block_length=1, shift=True)
    return {k: v for k, v in cfg.items() if v is not None}


def _write_weights(
    reader: Any,
    hp: LlamaHParams,
    folder: Path,
    dtype: str,
    append_row: bool,
    max_shard_bytes: int,
    progress: Callable[[int, int, str], None] | None,
) -> tuple[int, int]:
    """Dequantise tensor by tensor into safetensors shards (one shard in memory at a time).

    Returns (number of files, bytes written).
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    n_weights = sum(t.name != ROPE_FREQS for t in reader.tensors)
    shard_names: list[list[str]] = []
    current: dict[str, Any] = {}
    current_bytes = 0
    for i, (name, w) in enumerate(iter_state_dict(reader, hp)):
        if progress:
            progress(i + 1, n_weights, name)
        if append_row and name in ("model.embed_tokens.weight", "lm_head.weight"):
            # The new mask row is the mean embedding: a neutral input, and an unremarkable logit.
            w = np.concatenate([w, w.mean(axis=0, keepdims=True)], axis=0)
        # F32 tensors are read-only views of the memory-mapped file: copy before handing to torch.
        tensor = torch.from_numpy(np.require(w, requirements=["C", "W"])).to(torch_dtype)
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shard_names.append(_save_shard(current, folder, len(shard_names)))
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += size
    shard_names.append(_save_shard(current, folder, len(shard_names)))
    return _name_shards(shard_names, folder)


def _save_shard(tensors: dict[str, Any], folder: Path, idx: int) -> list[str]:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / f"shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
    return list(tensors)


def _name_shards(shard_names: list[list[str]], folder: Path) -> tuple[int, int]:
    """Give the shards their Hugging Face names, plus the index when there are several."""
    n = len(shard_names)
    if n == 1:
        os.replace(folder / "shard-00000.safetensors", folder / "model.safetensors")
        return 1, (folder / "model.safetensors").stat().st_size
    weight_map: dict[str, str] = {}
    total = 0
    for idx, names in enumerate(shard_names):
        final = f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
        os.replace(folder / f"shard-{idx:05d}.safetensors", folder / final)
        total += (folder / final).stat().st_size
        weight_map.update({name: final for name in names})
    # total_size is informational in the Hugging Face index; ours is the bytes on disk.
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(folder / "model.safetensors.index.json", index)
    return n, total


def _relax_permissions(folder: Path) -> None:
    """mkdtemp makes the folder private (0700); give the checkpoint the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished folder `tmp` with renames only (never a half-written `out`)."""
    _relax_permissions(tmp)
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "prev")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
