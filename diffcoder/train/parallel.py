"""Data parallelism around the loss module: DDP or FSDP2 (`fully_shard`), and full state dicts.

Checkpoints always hold *full* (unsharded) model and optimizer state, keyed by parameter name,
so a run saved with N processes (DDP or FSDP2) resumes with M processes in either mode or alone.
Gathering the FSDP2 state is a collective: every rank calls `full_states`, rank 0 writes.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

MODEL_PREFIX = "model."  # LossModule holds the model as `.model`


def wrap(loss_mod: nn.Module, mode: str, world: int, device: torch.device) -> nn.Module:
    """The module the training step calls. FSDP2 shards each decoder layer, then the rest (root)."""
    if world <= 1:
        return loss_mod
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in loss_mod.model.model.layers:
            fully_shard(layer)
        fully_shard(loss_mod)
        return loss_mod
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(loss_mod, device_ids=[device.index] if device.type == "cuda" else None)


def is_fsdp(loss_mod: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(loss_mod, FSDPModule)


def grad_sync(wrapped: nn.Module, loss_mod: nn.Module, enabled: bool) -> Any:
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if enabled:
        return nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(loss_mod, "set_requires_gradient_sync"):  # FSDP2
        loss_mod.set_requires_gradient_sync(False)
        return _restore_sync(loss_mod)
    return nullcontext()


class _restore_sync:
    def __init__(self, mod: nn.Module) -> None:
        self.mod = mod

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.mod.set_requires_gradient_sync(True)


def as_float(t: torch.Tensor) -> float:
    """A scalar that may be a DTensor (FSDP2 grad norm)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def full_states(loss_mod: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state without the LossModule prefix, optimizer state keyed by parameter name), on CPU.

    Under FSDP2 this is a collective and only rank 0 receives the tensors (others get empty dicts).
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    if is_fsdp(loss_mod):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(loss_mod, options=opts)
        osd = get_optimizer_state_dict(loss_mod, opt, options=opts)
    else:
        msd = {k: v.detach().cpu() for k, v in loss_mod.state_dict().items()}
        osd = get_optimizer_state_dict(loss_mod, opt)
        osd = _to_cpu(osd)
    model_sd = {k[len(MODEL_PREFIX):]: v for k, v in msd.items() if k.startswith(MODEL_PREFIX)}
    return model_sd, osd


def load_states(loss_mod: nn.Module, opt: torch.optim.Optimizer, model_sd: dict[str, torch.Tensor] | None,
                optim_sd: dict[str, Any]) -> None:
    """Load full states (from `full_states`, possibly saved under another world size or mode);
    model_sd None: the model's weights are restored elsewhere (adapters), only the optimizer here."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if model_sd is None:
        set_optimizer_state_dict(loss_mod, opt, optim_sd)
        return
    prefixed = {MODEL_PREFIX + k: v for k, v in model_sd.items()}
    if is_fsdp(loss_mod):
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(loss_mod, prefixed, options=full)
        _materialise_optimizer_state(opt)  # the full-state loader needs existing (sharded) state to fill
        set_optimizer_state_dict(loss_mod, opt, optim_sd, options=full)
    else:
        with torch.no_grad():
            loss_mod.load_state_dict(prefixed)  # strict: a missing or extra tensor is an error
        set_optimizer_state_dict(loss_mod, opt, optim_sd)


def _materialise_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create AdamW state without changing any parameter: one step with zero gradients at lr 0."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def shell_model(config: Any, state: dict[str, torch.Tensor], tokenizer: Any, mask_id: int | None) -> nn.Module:
    """A CPU DiffCoderLM holding `state` (rank 0's full copy of a sharded model) for saving."""
    from diffcoder.model import DiffCoderLM

    with torch.device("meta"):
        model = DiffCoderLM(config)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.tokenizer, model.mask_id = tokenizer, mask_id
    return model
