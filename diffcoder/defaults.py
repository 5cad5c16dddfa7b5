"""Where the default model lives (the one used when no --model is given), and the untrained stand-in.

The default is `diffcoder-tiny`, the small block-diffusion model trained by this repository's
own pipeline (runs/default_model.sh) and shipped inside the package
(diffcoder/weights/diffcoder-tiny). The larger `diffcoder-0.5b` is loaded by name
(`--model diffcoder-0.5b`, pulled on first use by diffcoder/hub.py); `make run` asks for it and,
with --fallback-tiny, falls back to this default when it cannot be pulled. Only when the shipped
weights are missing is the default a small random-weight checkpoint, built deterministically on
first use and labelled untrained: it exercises every code path but writes gibberish.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .fsutil import cache_root

SHIPPED_DIR = Path(__file__).resolve().parent / "weights" / "diffcoder-tiny"
UNTRAINED_NAME = "untrained-tiny-v1"
UNTRAINED_PRESET = "untrained-tiny"  # a name in config.PRESETS


def default_model_dir(announce: bool = True) -> Path:
    """The shipped trained model if present, else the untrained stand-in (built if needed)."""
    if (SHIPPED_DIR / "config.json").exists():
        return SHIPPED_DIR
    path = cache_root() / UNTRAINED_NAME
    if not (path / "config.json").exists():
        build_untrained(path)
    if announce:
        print(f"note: using the UNTRAINED default checkpoint {path} (random weights: output is gibberish); "
              "pass --model DIR for a real model", file=sys.stderr)
    return path


def build_untrained(path: str | Path, seed: int = 0, **shape: int) -> Path:
    """A deterministic random-weight checkpoint with a byte-level tokenizer and chat template."""
    import torch

    from .checkpoint import save
    from .config import PRESETS, ModelConfig
    from .model import DiffCoderLM
    from .tokenizer import Tokenizer, byte_level_tokenizer, save_tokenizer

    path = Path(path)
    tok_dir = path.with_name(path.name + ".tokenizer-tmp")
    save_tokenizer(byte_level_tokenizer(), tok_dir)
    tok = Tokenizer.from_dir(tok_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, mask_token_id=tok.mask_id, **{**PRESETS[UNTRAINED_PRESET], **shape})
    model = DiffCoderLM(cfg).init_weights(seed, std=0.5)
    model.mask_id = tok.mask_id
    save(model.to(torch.float32), path, tokenizer=tok,
         generation_config={"diffcoder_untrained": True, "gen_length": 64, "steps": 64, "block_length": 4})
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    return path
