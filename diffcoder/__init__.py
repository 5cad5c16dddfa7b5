"""diffcoder: block-diffusion code language models (Stable-DiffCoder style).

    model = diffcoder.load()  # the default model; or diffcoder.load("path/to/checkpoint")
    out = diffcoder.generate(model, "def fibonacci(n):", max_new_tokens=64)
    print(out.texts[0])

Token ids work too: diffcoder.generate(model, [ids], gen_length=64, eos_id=...) -> out.tokens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "save", "generate", "infill", "infill_many", "Decoding", "GenerateResult", "default_model_dir",
           "ModelConfig", "DiffCoderLM"]

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import load, save
    from .config import ModelConfig
    from .decode import Decoding, GenerateResult, generate
    from .defaults import default_model_dir
    from .fim import infill, infill_many
    from .model import DiffCoderLM

_LAZY = {
    "load": "checkpoint", "save": "checkpoint", "generate": "decode", "Decoding": "decode",
    "GenerateResult": "decode", "infill": "fim", "infill_many": "fim", "default_model_dir": "defaults",
    "ModelConfig": "config", "DiffCoderLM": "model",
}


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import diffcoder` (and `diffcoder --help`) free of torch start-up time.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'diffcoder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
