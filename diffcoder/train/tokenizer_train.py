"""Byte-level BPE for code, with the model family's special tokens and chat template.

The specials take ids 0..6 in `diffcoder.tokenizer.SPECIAL_TOKENS` order (bos 0, pad 1,
eos 2, FIM prefix/suffix, mask 5, FIM middle), as in Seed-Coder; then the 256 byte symbols,
then the learned merges. Written with `save_tokenizer`, so `transformers.AutoTokenizer` and
`diffcoder.load` read it, with the chat template in tokenizer_config.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from diffcoder.fsutil import refuse_overwrite, staged_dir

from .corpus import CODE_EXTENSIONS, collect_corpus


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None) -> Any:
    """A raw `tokenizers.Tokenizer` trained on `texts` (any iterable: streamed, never all in memory)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from diffcoder.tokenizer import SPECIAL_TOKENS

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size <= floor:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the specials and the 256 byte symbols "
                         f"already take {floor} ids; use at least {floor + 1}")
    tk = RawTokenizer(models.BPE())
    # Same pre-tokenization as diffcoder.tokenizer.byte_level_tokenizer: GPT-2 style regex on bytes.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer, length=length)
    for i, tok in enumerate(SPECIAL_TOKENS):  # the id layout other code relies on
        if tk.token_to_id(tok) != i:
            raise RuntimeError(f"BPE trainer placed {tok} at {tk.token_to_id(tok)}, expected {i}")
    return tk


def train_tokenizer(sources: list[Path] | None, vocab_size: int, out: str | Path, *, min_frequency: int = 2,
                    max_files: int | None = None, max_file_bytes: int = 1_000_000,
                    extensions: tuple[str, ...] = CODE_EXTENSIONS, overwrite: bool = False) -> dict[str, Any]:
    """Train on the corpus walk (same filters as `data build`) and write TOKDIR atomically."""
    from diffcoder.tokenizer import Tokenizer, save_tokenizer

    out = Path(out)
    refuse_overwrite(out, overwrite, "--overwrite")
    _, files, _ = collect_corpus(sources, extensions, max_file_bytes, max_files)
    texts = (t for t in (f.read_text() for f in files) if t is not None)
    raw = train_bpe(texts, vocab_size, min_frequency, length=len(files))
    with staged_dir(out) as tmp:
        save_tokenizer(raw, tmp)
        tok = Tokenizer.from_dir(tmp)  # proves the output loads before it is published
    return {"out": str(out), "files": len(files), "vocab_size": tok.vocab_size, "requested": vocab_size}
