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
    from .checkpoint import save
    from .config import ModelConfig
    from .defaults import default_model_dir
    from .engine.decoding import Decoding, GenerateResult, generate
    from .engine.infill import infill, infill_many
    from .hub import load
    from .model import DiffCoderLM

# Public name -> the module that defines it (imported on first use: see __getattr__). No
# submodule of the package may be named like one of these: once imported, the submodule becomes
# the package attribute and shadows the function (`diffcoder.infill` lives in engine/infill.py).
_LAZY = {
    "load": "diffcoder.hub", "save": "diffcoder.checkpoint", "generate": "diffcoder.engine.decoding",
    "Decoding": "diffcoder.engine.decoding", "GenerateResult": "diffcoder.engine.decoding",
    "infill": "diffcoder.engine.infill", "infill_many": "diffcoder.engine.infill",
    "default_model_dir": "diffcoder.defaults", "ModelConfig": "diffcoder.config", "DiffCoderLM": "diffcoder.model",
}


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import diffcoder` (and `diffcoder --help`) free of torch start-up time.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffcoder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
