"""GGUF (llama.cpp) -> Hugging Face-layout checkpoint for Llama-family models (llama, qwen2).

`gguf_read.py` reads the file in Hugging Face terms (tensor names such as `blk.N.attn_q.weight` ->
`model.layers.N.self_attn.q_proj.weight`, llama.cpp's q/k permutation undone); this module writes:
- the weights, tensor by tensor, into safetensors shards;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffcoder.convert.gguf_read import (ARCHITECTURES, ROPE_FREQS, LlamaHParams, check_quant_types,
                                         check_tensor_names, iter_state_dict, open_gguf, read_hparams, read_vocab)
from diffcoder.convert.gguf_tokenizer import GGUFVocab, check_supported, save_tokenizer
from diffcoder.fsutil import atomic_write_text, refuse_overwrite, staged_dir

DEFAULT_MASK_TOKEN = "<[MASK_TOKEN]>"  # the spelling Stable-DiffCoder's tokenizer uses
DTYPES = ("bfloat16", "float32")
DEFAULT_MAX_SHARD_BYTES = 4 << 30
# PretrainedConfig bookkeeping that says nothing about a causal LM; left out of config.json.
_GENERIC_CONFIG_KEYS = {
    "_name_or_path", "id2label", "label2id", "problem_type", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
}


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
    refuse_overwrite(out, overwrite, "--force")
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

    with staged_dir(out) as tmp:
        n_files, n_bytes = _write_weights(reader, hp, tmp, dtype, append_row, max_shard_bytes, progress)
        save_tokenizer(vocab, tmp, model_max_length=hp.max_positions)
        _write_json(tmp / "config.json", hf_config(hp, vocab, mask_id, vocab_size, dtype))
        _write_json(tmp / "generation_config.json", _generation_config(vocab, autoregressive=mask_added))
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

    Returns (number of files, bytes of tensor data).
    """
    import torch

    from diffcoder.checkpoint import ShardWriter

    torch_dtype = getattr(torch, dtype)
    n_weights = sum(t.name != ROPE_FREQS for t in reader.tensors)
    shards = ShardWriter(folder, max_shard_bytes)
    for i, (name, w) in enumerate(iter_state_dict(reader, hp)):
        if progress:
            progress(i + 1, n_weights, name)
        if append_row and name in ("model.embed_tokens.weight", "lm_head.weight"):
            # The new mask row is the mean embedding: a neutral input, and an unremarkable logit.
            w = np.concatenate([w, w.mean(axis=0, keepdims=True)], axis=0)
        # F32 tensors are read-only views of the memory-mapped file: copy before handing to torch.
        shards.add(name, torch.from_numpy(np.require(w, requirements=["C", "W"])).to(torch_dtype))
    return shards.close()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
