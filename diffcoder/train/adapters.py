"""Low-rank adapters (LoRA, Hu et al. 2021, through peft) for block-diffusion conversion.

The base model stays frozen; every linear layer of the decoder gains a rank-r update, and the
mask token's input embedding (a row the AR model never trained) is trained whole. An adapter
directory is peft's own format (`adapter_config.json` + `adapter_model.safetensors`, tensor names
`base_model.model.<module>...`), so `peft.PeftModel.from_pretrained` reads it over the base
checkpoint loaded by transformers as well. `merge` folds the adapter into the weights: the
result is a plain checkpoint that decodes at full speed with no adapter code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"  # peft's adapter name; left out of the saved tensor names, as peft does


def lora_config(rank: int, alpha: float, dropout: float, mask_id: int | None, tied: bool) -> Any:
    from peft import LoraConfig

    # With tied embeddings the mask row would also change the output layer's mask logit, which
    # peft folds in only on merge; train it only where input and output embeddings are separate.
    tokens = {"embed_tokens": [int(mask_id)]} if mask_id is not None and not tied else None
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS),
                      trainable_token_indices=tokens, bias="none")


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0) -> Any:
    """Freeze `model` and inject trainable adapters in place; returns peft's LoraModel around it.
    The adapters' random initialisation is a function of `seed` alone (not of the global RNG)."""
    from peft.tuners.lora import LoraModel

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg = lora_config(rank, alpha, dropout, model.mask_id, model.config.tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoraModel(model, cfg, _ADAPTER)


def save_adapter(lora: Any, out: Path, base: str | None = None) -> Path:
    """Write `out/` in peft's adapter format (atomic)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from diffcoder.fsutil import atomic_write_text, staged_dir

    sd = get_peft_model_state_dict(lora.model, adapter_name=_ADAPTER)
    with staged_dir(out) as tmp:
        save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        cfg = lora.peft_config[_ADAPTER].to_dict()
        cfg.update(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base)
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(_jsonable(cfg), indent=2, sort_keys=True) + "\n")
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors without the peft prefix) of an adapter directory, with clear errors."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file}: not valid JSON ({exc})") from None
    if cfg.get("peft_type") != "LORA" or not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise ValueError(f"{cfg_file}: not a LoRA adapter config (peft_type LORA and an integer r >= 1)")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type
        raise ValueError(f"{weights}: cannot read safetensors file, truncated or corrupt? ({exc})") from None
    return cfg, {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def attach_adapter(model: nn.Module, path: str | Path) -> Any:
    """Inject the adapter at `path` into `model` (trainable, as `add_lora` makes it); returns the LoraModel."""
    cfg, _ = read_adapter(path)
    lora = add_lora(model, cfg["r"], float(cfg.get("lora_alpha", cfg["r"])), float(cfg.get("lora_dropout", 0.0)))
    load_adapter_weights(lora, path)
    return lora


def load_adapter_weights(lora: Any, path: str | Path) -> None:
    """Set the injected adapter's tensors from the adapter directory at `path` (all of them, exact shapes)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    _, tensors = read_adapter(path)
    expected = get_peft_model_state_dict(lora.model, adapter_name=_ADAPTER)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: adapter does not fit this model (missing {missing[:2]}, unexpected {extra[:2]}); "
                         "was it made for another base or rank?")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, this model needs {tuple(expected[k].shape)}")
    set_peft_model_state_dict(lora.model, tensors, adapter_name=_ADAPTER)


def merge(lora: Any) -> nn.Module:
    """Fold the adapter into the base weights; returns the plain model (no adapter modules left)."""
    model = lora.merge_and_unload(progressbar=False)
    model.requires_grad_(False)
    return model


def merge_adapter_exact(model: nn.Module, path: str | Path) -> nn.Module:
    """Merge the LoRA adapter at `path` into `model`'s weights in place, reproducibly: each update
    W + (alpha / r) * B @ A is formed in float64 and rounded once to the weights' dtype, so the
    result is the same bytes on any machine (what `diffcoder pull` checks against a stored hash)."""
    cfg, tensors = read_adapter(path)
    scale = float(cfg.get("lora_alpha", cfg["r"])) / cfg["r"]
    params = dict(model.named_parameters())
    pairs = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    rows = cfg.get("trainable_token_indices") or {}
    expected = {f"{n.removesuffix('.weight')}" for n in params
                if n.endswith(".weight") and n.split(".")[-2] in LORA_TARGETS}
    if pairs != expected:
        raise ValueError(f"{path}: the adapter covers {len(pairs)} layers, this model has {len(expected)} "
                         "adaptable ones; was it made for another base?")
    with torch.no_grad():
        for name in sorted(pairs):
            w = params[name + ".weight"]
            a, b = tensors[name + ".lora_A.weight"].double(), tensors[name + ".lora_B.weight"].double()
            if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
                raise ValueError(f"{path}: {name} adapter shapes {tuple(b.shape)} x {tuple(a.shape)} do not fit "
                                 f"weight {tuple(w.shape)}")
            w.copy_((w.double() + scale * (b @ a)).to(w.dtype))
        for module, ids in rows.items():
            delta = tensors.get(f"model.{module}.token_adapter.trainable_tokens_delta")
            weight = params.get(f"model.{module}.weight")
            if delta is None or weight is None or delta.shape != (len(ids), weight.shape[1]):
                raise ValueError(f"{path}: trainable rows of {module} missing or misshapen")
            weight[torch.tensor(ids)] = delta.to(weight.dtype)
    return model
