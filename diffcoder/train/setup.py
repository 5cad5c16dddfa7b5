"""What a run needs before its first step: processes and device, the run directory, the model
(fresh, from --init, or wrapped with adapters), the optimizer and its LR schedule."""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diffcoder.fsutil import read_json
from diffcoder.hardware import pick_device, pick_dtype

from .checkpointing import CKPT_DIR
from .config import TrainConfig
from .datadir import tokenizer_fingerprint

# Llama config fields accepted in a --model-config JSON besides ModelConfig's own.
HF_IGNORED_FIELDS = {"hidden_act", "initializer_range", "use_cache", "attention_dropout", "pretraining_tp",
                     "transformers_version", "rope_parameters", "torch_dtype", "dtype"}


class DistInfo:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_device(cfg: TrainConfig, d: DistInfo) -> torch.device:
    device = torch.device(pick_device(cfg.device))
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # processes share the cores: do not oversubscribe them
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    return device


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return pick_dtype(cfg.precision, device) == torch.bfloat16


def check_out_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write there ({exc.strerror}); choose a writable directory") from None
    has_ckpt = any((out / CKPT_DIR).glob("step-*")) if (out / CKPT_DIR).exists() else False
    if not cfg.resume and (has_ckpt or (out / "final").exists()):
        raise ValueError(f"--out {out}: already holds a run (checkpoints or final/); pass --resume to continue it "
                         "or choose a new --out")
    return out


def build_model(cfg: TrainConfig, data_tok_info: dict[str, Any]) -> tuple[Any, Any]:
    """(model in float32 on CPU, tokenizer), checked against the data's tokenizer."""
    import diffcoder
    from diffcoder.config import ModelConfig
    from diffcoder.model import DiffCoderLM

    from .datadir import load_tokenizer

    if cfg.init:
        model = diffcoder.load(cfg.init, dtype=torch.float32)
        tok = model.tokenizer
        if cfg.tokenizer:
            given = load_tokenizer(cfg.tokenizer)
            if tok is not None and tokenizer_fingerprint(given) != tokenizer_fingerprint(tok):
                raise ValueError(f"--tokenizer {cfg.tokenizer} differs from the tokenizer saved in --init {cfg.init}")
            tok = given
        if tok is None:
            raise ValueError(f"--init {cfg.init}: the checkpoint has no tokenizer; pass --tokenizer TOKDIR")
        src = f"--init {cfg.init}"
    else:
        if not cfg.tokenizer:
            raise ValueError("--model-config needs --tokenizer TOKDIR (the vocabulary size and special ids "
                             "come from it)")
        tok = load_tokenizer(cfg.tokenizer)
        fields = model_config_fields(cfg.model_config)
        fields.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, mask_token_id=tok.mask_id)
        fields["max_position_embeddings"] = max(int(fields.get("max_position_embeddings", 2048)), cfg.seq_len)
        model = DiffCoderLM(ModelConfig(**fields)).init_weights(cfg.seed)
        model.mask_id = tok.mask_id
        src = f"--tokenizer {cfg.tokenizer}"
    model.tokenizer = tok
    fp = tokenizer_fingerprint(tok)
    if data_tok_info["fingerprint"] != fp:
        raise ValueError(f"tokenizer mismatch: --data {cfg.data} was tokenized with tokenizer {data_tok_info['fingerprint']} "
                         f"({data_tok_info['vocab_size']} tokens) but {src} has {fp} ({tok.vocab_size} tokens); "
                         "rebuild the data with this tokenizer")
    if data_tok_info["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"vocab mismatch: the data uses {data_tok_info['vocab_size']} token ids but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    if cfg.diffusion and model.mask_id is None:
        raise ValueError(f"{src}: no mask token id; block diffusion needs <[MASK_TOKEN]>")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    return model, tok


def model_config_fields(spec: str) -> dict[str, Any]:
    """Preset name or JSON file of Llama fields -> ModelConfig keyword arguments."""
    from diffcoder.config import PRESETS, ModelConfig

    if spec in PRESETS:
        return dict(PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--model-config {spec!r}: not a preset ({', '.join(PRESETS)}) and not a JSON file")
    raw = read_json(path, f"--model-config {path}")
    if not isinstance(raw, dict):
        raise ValueError(f"--model-config {path}: expected a JSON object of Llama config fields")
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    unknown = sorted(set(raw) - known - HF_IGNORED_FIELDS - {"architectures", "model_type"})
    if unknown:
        raise ValueError(f"--model-config {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = ModelConfig.from_dict({"vocab_size": 1, **raw}, source=str(path))  # validates heads etc. (vocab from the tokenizer)
    fields = {k: getattr(cfg, k) for k in raw if k in known and k not in ("vocab_size",)}
    fields["rope_theta"] = cfg.rope_theta
    return fields


def lr_lambda(cfg: TrainConfig):  # noqa: ANN201 (a closure for LambdaLR)
    """Factor of --lr at optimizer step s (0-based): linear warmup, then cosine / WSD / constant."""
    warm, total, floor = cfg.lr_warmup_steps, cfg.steps, cfg.min_lr / cfg.lr

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "cosine":
            p = min(1.0, (s - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        decay = int(round(cfg.wsd_decay_frac * total))  # wsd: stable, then linear decay over the last part
        start = total - decay
        if s < start or decay == 0:
            return 1.0
        return 1.0 - (1 - floor) * min(1.0, (s - start + 1) / decay)

    return factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
