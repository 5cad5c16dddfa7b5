"""Rebuild a Hugging Face tokenizer from the vocabulary a GGUF file stores as metadata.

A GGUF file carries no `tokenizer.json`: llama.cpp keeps the token strings, the BPE merges, a
type per token (normal / control / user-defined / ...), the special token ids and the chat
template under `tokenizer.*` keys, plus a pre-tokenizer *name* (`tokenizer.ggml.pre`) whose split
regexes live in llama.cpp's C++ source. We turn that back into a `tokenizers.Tokenizer` (byte-level
BPE, the GPT-2 family that Llama-3, SmolLM, Qwen and Seed-Coder use) and let `transformers` write
the files, so the output is exactly what `AutoTokenizer` expects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Token types as llama.cpp writes them in `tokenizer.ggml.token_type` (gguf.TokenType).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# The split regexes of llama.cpp's BPE pre-tokenizers, keyed by the `tokenizer.ggml.pre` names
# that map to them (llama.cpp src/llama-vocab.cpp). Each list is applied in order, as llama.cpp's
# unicode_regex_split does, then bytes are mapped to the GPT-2 byte alphabet. The spellings are
# those of the models' own tokenizer.json files where llama.cpp rewrote them for its regex engine.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS: dict[str, list[str]] = {
    **{name: [_GPT2] for name in ("gpt2", "gpt-2", "mpt", "olmo", "jais")},
    # StarCoder-style vocabularies split every digit off first (SmolLM inherits this).
    **{name: [r"\p{N}", _GPT2] for name in ("starcoder", "refact", "command-r", "smollm", "codeshell")},
    **{name: [_LLAMA3] for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{name: [_QWEN2] for name in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
    "seed-coder": [_SEED_CODER],
}
# llama.cpp skips the merges when a whole pre-token is already in the vocabulary for these.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}

SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_SPLITS))


@dataclass
class GGUFVocab:
    """The `tokenizer.*` metadata of a GGUF file, under readable names."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (sentencepiece), ...
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    extra_special: list[str] = field(default_factory=list)  # e.g. an appended mask token

    def token(self, token_id: int | None) -> str | None:
        """The string of `token_id`, or None when the id is absent or out of range."""
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]


def check_supported(vocab: GGUFVocab) -> None:
    """Raise ValueError naming what is unsupported, before any heavy work starts."""
    if vocab.model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {vocab.model!r} is not supported: only byte-level BPE "
            "(tokenizer.ggml.model = 'gpt2', as in Llama-3, SmolLM, Qwen, Seed-Coder) can be rebuilt"
        )
    if vocab.pre not in _SPLITS:
        raise ValueError(
            f"GGUF pre-tokenizer {vocab.pre!r} is not supported; known: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    if not vocab.merges:
        raise ValueError("the GGUF file has no tokenizer.ggml.merges: cannot rebuild a BPE tokenizer")
    if len(set(vocab.tokens)) != len(vocab.tokens):
        raise ValueError("the GGUF vocabulary has duplicate token strings: ids would not round-trip")


def build_backend(vocab: GGUFVocab) -> Any:
    """The `tokenizers.Tokenizer` that the GGUF vocabulary describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    check_supported(vocab)
    merges = [_split_merge(m) for m in vocab.merges]
    bpe = models.BPE(
        vocab={tok: i for i, tok in enumerate(vocab.tokens)},
        merges=merges,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=vocab.pre in _IGNORE_MERGES,
    )
    tok = Tokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS[vocab.pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(vocab, processors)
    # Control tokens match whole and are dropped by skip_special_tokens; user-defined ones match
    # whole but are ordinary text (llama.cpp's split between the two, mirrored).
    types = vocab.token_types or [0] * len(vocab.tokens)
    special = [t for t, ty in zip(vocab.tokens, types) if ty == TOKEN_TYPE_CONTROL]
    user = [t for t, ty in zip(vocab.tokens, types) if ty == TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    # Appended tokens (the mask) get the next ids, in order, after the GGUF vocabulary.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in vocab.extra_special])
    return tok


def _split_merge(merge: str) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2:
        raise ValueError(f"malformed BPE merge {merge!r} in tokenizer.ggml.merges (want 'left right')")
    return parts[0], parts[1]


def _post_processor(vocab: GGUFVocab, processors: Any) -> Any:
    """Add BOS/EOS around every encoding when the GGUF asks for it, as llama.cpp does."""
    bos = vocab.token(vocab.bos_id) if vocab.add_bos else None
    eos = vocab.token(vocab.eos_id) if vocab.add_eos else None
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False)
    pre = [f"{bos}:0"] if bos else []
    post = [f"{eos}:0"] if eos else []
    specials = [(t, vocab.tokens.index(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(
        single=pre + ["$A:0"] + post,
        pair=pre + ["$A:0"] + post + pre + ["$B:1"] + post,
        special_tokens=specials,
    )


def save_tokenizer(vocab: GGUFVocab, out_dir: Path, *, model_max_length: int) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ chat template) with the specials named.

    The special tokens are given by name explicitly: left to itself, transformers may pick a
    tokenizer class whose defaults (e.g. bos = eos = '<|endoftext|>') disagree with the model.
    """
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(vocab),
        bos_token=vocab.token(vocab.bos_id),
        eos_token=vocab.token(vocab.eos_id),
        unk_token=vocab.token(vocab.unk_id),
        pad_token=vocab.token(vocab.pad_id),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if vocab.chat_template:
        hf.chat_template = vocab.chat_template
    hf.save_pretrained(str(out_dir))
