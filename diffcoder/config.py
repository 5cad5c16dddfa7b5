"""Model configuration: one dataclass, read from and written to a Hugging Face `config.json`.

Both spellings of the rotary settings are understood: transformers 4.x (`rope_theta`,
`rope_scaling`) and 5.x (`rope_parameters`). Unknown keys are kept in `extra` so a
load/save round trip never drops what a checkpoint carries.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import read_json

# How each model pass can run (diffcoder/engine/runners.py) and which positions a denoising step
# re-masks (diffcoder/engine/decoding.py). Defined here, where nothing imports torch, so that the
# CLI can offer the names without paying torch's start-up in `diffcoder --help`, and the checkpoint
# loader can check generation_config.json without importing the engine.
RUNNERS = ("auto", "eager", "static", "cuda_graph", "compiled_static", "compiled_cuda_graph")
REMASKING = ("low_confidence", "random", "left_to_right")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "StableDiffcoderForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


# Sizes that must be positive integers (head_dim may also be None: hidden_size / heads).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q, k, v and o projections
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    model_type: str = "llama"
    architectures: list[str] = field(default_factory=lambda: ["LlamaForCausalLM"])
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if value is None and name == "head_dim":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def num_parameters(self) -> int:
        h, i, L, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + L * per_layer + h + head

    # ------------------------------------------------------------------ json
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        raw = dict(raw)
        raw.pop("auto_map", None)  # remote code is never executed: the architecture is ours
        archs = raw.get("architectures") or ["LlamaForCausalLM"]
        model_type = raw.get("model_type", "llama")
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unsupported architecture {archs} (model_type {model_type!r}); "
                f"diffcoder supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = raw.pop("rope_parameters", None) or {}
        scaling = raw.pop("rope_scaling", None)
        theta = raw.pop("rope_theta", None) or rope.get("rope_theta") or 10000.0
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        kwargs = {k: raw.pop(k) for k in list(raw) if k in known}
        if model_type == "qwen2":
            kwargs["qkv_bias"] = True
        kwargs.pop("extra", None)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kwargs]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        if not isinstance(theta, (int, float)) or isinstance(theta, bool):
            raise ValueError(f"{source}: rope_theta must be a positive number, got {theta!r}")
        try:
            return cls(**kwargs, rope_theta=float(theta), rope_scaling=scaling, extra=raw)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "qkv_bias"):
                continue
            out[f.name] = getattr(self, f.name)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            rope.setdefault("rope_type", rope.pop("type", "default"))
            out["rope_scaling"] = dict(self.rope_scaling)
        out["rope_parameters"] = rope
        out["hidden_act"] = "silu"
        out.setdefault("use_cache", True)
        if self.torch_dtype is None:
            out.pop("torch_dtype")
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        return cls.from_dict(read_json(path), source=str(path))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


# Named shapes used by tests, benchmarks and the training presets; the one table of model shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # The untrained default checkpoint (defaults.build_untrained): its seeded weights depend on this shape.
    "untrained-tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=2048),
    "10m": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4),
    "smol-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    # smol-135m's op graph (30 layers, 3 query heads per KV head, tied embeddings) with next to no
    # weights: what a pass of that graph costs beyond its arithmetic and its bytes (benchmarks).
    "smol-135m-skeleton": dict(hidden_size=96, intermediate_size=128, num_hidden_layers=30, num_attention_heads=3,
                               num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True, rope_theta=100000.0),
    "sdc-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=155136, rope_theta=500000.0,
                   max_position_embeddings=8192, bos_token_id=0, eos_token_id=2, mask_token_id=5),
}
