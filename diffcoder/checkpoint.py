"""Hugging Face-layout checkpoints: config.json + (sharded) safetensors + tokenizer files.

Loading builds the module on the meta device and assigns each tensor straight from the
memory-mapped safetensors file in the target dtype and device, so an 8B checkpoint is never
held twice. `auto_map` / remote code is never executed: the architecture is ours.
Saving writes into a temporary directory and renames it into place (atomic).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from .config import REMASKING, ModelConfig
from .fsutil import atomic_write_text, read_json, sha256_file, staged_dir
from .hardware import pick_dtype
from .model import DiffCoderLM
from .tokenizer import Tokenizer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Keys some exporters write that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise FileNotFoundError(f"{f}: shard listed in {INDEX_NAME} is missing")
        return files
    single = path / WEIGHTS_NAME
    if single.exists():
        with _open_safetensors(single) as fh:
            return {name: single for name in fh.keys()}
    if (path / "pytorch_model.bin").exists():
        raise ValueError(f"{path}: only pytorch_model.bin found; diffcoder reads safetensors "
                         "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def weights_sha256(path: str | Path) -> str:
    """The identity of a checkpoint's weights: the sha256 of its one safetensors file (what
    `diffcoder pull` checks), or of the shards' names and sha256s in order."""
    files = sorted(set(weight_files(Path(path)).values()))
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{f.name} {sha256_file(f)}\n" for f in files).encode()).hexdigest()


class _open_safetensors:
    """safe_open with an error that names the file (truncated or corrupt files)."""

    def __init__(self, file: Path, device: str = "cpu") -> None:
        self.file, self.device = file, device

    def __enter__(self) -> Any:
        from safetensors import safe_open

        try:
            self.ctx = safe_open(str(self.file), framework="pt", device=self.device)
            return self.ctx.__enter__()
        except Exception as exc:  # safetensors raises SafetensorError (not exported in all versions)
            raise ValueError(f"{self.file}: cannot read safetensors file, truncated or corrupt? ({exc})") from None

    def __exit__(self, *exc: object) -> None:
        self.ctx.__exit__(*exc)


def resolve_mask_id(config: ModelConfig, tokenizer: Tokenizer | None, source: Path) -> int:
    if config.mask_token_id is not None:
        return int(config.mask_token_id)
    if tokenizer is not None and tokenizer.mask_id is not None:
        return int(tokenizer.mask_id)
    raise ValueError(f"{source}: no mask token: set `mask_token_id` in config.json or give the tokenizer a "
                     "<[MASK_TOKEN]> / mask_token (block-diffusion decoding needs one)")


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         mask_id: int | None = None) -> DiffCoderLM:
    """Load a Hugging Face-layout checkpoint directory into a `DiffCoderLM` (eval mode). Model names
    and the default model are `diffcoder.load`'s (diffcoder/hub.py)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
    config = ModelConfig.from_json(path / "config.json")
    dtype = pick_dtype(dtype if dtype is not None else config.torch_dtype or "float32", device)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but config.json vocab_size is "
                         f"{config.vocab_size}: the tokenizer does not belong to this model")
    with torch.device("meta"):
        model = DiffCoderLM(config)
    _assign_weights(model, path, torch.device(device), dtype)
    model.tokenizer = tokenizer
    model.source = path  # the checkpoint directory (what `weights_sha256` reads)
    model.mask_id = mask_id if mask_id is not None else resolve_mask_id(config, tokenizer, path)
    gen_file = path / "generation_config.json"
    if gen_file.exists():
        model.generation_defaults = read_generation_config(gen_file)
    return model.eval()


def read_generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json, with every decoder setting it names checked (ValueError naming the
    file and the field); keys the decoder does not read (special ids, ...) pass through."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object of decoder settings, got {type(raw).__name__}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    rules: dict[str, tuple[Callable[[Any], bool], str]] = {
        "gen_length": (lambda v: integer(v) and v >= 1, "a positive integer"),
        "block_length": (lambda v: integer(v) and v >= 1, "a positive integer"),
        "steps": (lambda v: v is None or (integer(v) and v >= 1), "a positive integer or null"),
        "max_active_blocks": (lambda v: integer(v) and v >= 1, "a positive integer"),
        "temperature": (lambda v: number(v) and v >= 0, "a number >= 0"),
        "threshold": (lambda v: v is None or (number(v) and 0 < v <= 1), "a number in (0, 1] or null"),
        "block_add_threshold": (lambda v: number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "remasking": (lambda v: v in REMASKING, "one of " + ", ".join(map(repr, REMASKING))),
        "shift": (lambda v: isinstance(v, bool), "true or false"),
        "speculative": (lambda v: isinstance(v, bool), "true or false"),
        "seed": (lambda v: v is None or integer(v), "an integer or null"),
    }
    for key, (ok, what) in rules.items():
        if key in raw and not ok(raw[key]):
            raise ValueError(f"{path}: {key!r} must be {what}, got {json.dumps(raw[key])}")
    gen, block, steps = raw.get("gen_length"), raw.get("block_length"), raw.get("steps")
    if gen is not None and block is not None:
        if gen % block:
            raise ValueError(f"{path}: 'gen_length' ({gen}) must be a multiple of 'block_length' ({block})")
        if steps is not None and steps % (gen // block):
            raise ValueError(f"{path}: 'steps' ({steps}) must be a multiple of gen_length/block_length "
                             f"= {gen // block}")
    return raw


def _assign_weights(model: DiffCoderLM, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    files = weight_files(path)
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise ValueError(f"{f}: unexpected tensor {name!r} (not part of a {model.config.architectures[0]})")
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with _open_safetensors(f, "cpu") as fh:
            for name in names:
                t = fh.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies "
                                     f"{tuple(expected[name].shape)}")
                state[name] = t.to(device=device, dtype=dtype)
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def save(model: DiffCoderLM, path: str | Path, tokenizer: Tokenizer | None = None,
         max_shard_bytes: int | None = None, dtype: str | torch.dtype | None = None,
         generation_config: dict[str, Any] | None = None) -> Path:
    """Write `model` as a Hugging Face-layout checkpoint (atomically replaces `path`)."""
    path = Path(path)
    dtype = pick_dtype(dtype) if dtype is not None else model.dtype
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    with staged_dir(path) as tmp:
        # copy=True: fused projections make parameters views of one tensor, which safetensors refuses.
        state = {k: v.detach().to("cpu", dtype, copy=True).contiguous() for k, v in model.state_dict().items()
                 if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
        shards = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in state.items():
            shards.add(name, tensor)
        shards.close()
        config = model.config
        config.torch_dtype = str(dtype).removeprefix("torch.")
        if model.mask_id is not None:
            config.mask_token_id = int(model.mask_id)
        atomic_write_text(tmp / "config.json", config.to_json())
        gen = generation_config if generation_config is not None else model.generation_defaults
        if gen:
            atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.hf.save_pretrained(str(tmp))
    return path


class ShardWriter:
    """Safetensors shards of at most `max_bytes` each (None: one file), written as the tensors
    arrive, so that one shard at a time is in memory; `close()` gives them their Hugging Face
    names (model.safetensors, or model-0000i-of-0000n.safetensors plus the index) and returns
    (files, bytes of tensor data)."""

    def __init__(self, folder: Path, max_bytes: int | None = None) -> None:
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.written: list[list[str]] = []  # tensor names, per shard file
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.max_bytes and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self._part(len(self.written))), metadata={"format": "pt"})
        self.written.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _part(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}.safetensors"

    def close(self) -> tuple[int, int]:
        self._flush()
        n = len(self.written)
        if n == 1:
            self._part(0).rename(self.folder / WEIGHTS_NAME)
            return 1, self.total_bytes
        weight_map = {}
        for i, names in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._part(i).rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        atomic_write_text(self.folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return n, self.total_bytes
