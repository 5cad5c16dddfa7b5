"""Fill-in-the-middle with the tokenizer's FIM tokens, in the model's own order (`Tokenizer.fim_order`)."""
from __future__ import annotations

from typing import Any

from .decoding import generate
from .settings import MODEL_DEFAULT
from ..tokenizer import Tokenizer


def infill_many(model: Any, pairs: list[tuple[str, str]], *, tokenizer: Tokenizer | None = None,
                gen_length: int = 64, steps: int | None = None, block_length: int = MODEL_DEFAULT,
                **decoder: Any) -> list[str]:
    """Middles for many (prefix, suffix) pairs, decoded in one batch; each cut at EOS. At most
    `gen_length` tokens (a middle is short), one per forward pass unless `steps` says otherwise;
    every other decoder setting left out is the model's, as in `diffcoder.generate`."""
    tok = tokenizer or model.tokenizer
    if tok is None:
        raise ValueError("infilling needs a tokenizer: the checkpoint has none, pass tokenizer=")
    prompts = [tok.fim_prompt(prefix, suffix) for prefix, suffix in pairs]
    decoder.setdefault("eos_id", tok.eos_id)
    res = generate(model, prompts, gen_length=gen_length, steps=steps or gen_length, block_length=block_length,
                   **decoder)
    eos = decoder["eos_id"]
    return [tok.decode([t for t in ids if t != eos]) for ids in res.tokens]


def infill(model: Any, prefix: str, suffix: str, *, tokenizer: Tokenizer | None = None, **kwargs: Any) -> str:
    """The middle that joins `prefix` and `suffix` (decoder flags as in `diffcoder.generate`)."""
    return infill_many(model, [(prefix, suffix)], tokenizer=tokenizer, **kwargs)[0]
