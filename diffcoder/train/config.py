"""The trainer's settings: one dataclass, filled from defaults < TOML file < command-line flags.

Every field is a `diffcoder train` flag (underscores become dashes) and a TOML key; an
unknown TOML key is an error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OBJECTIVES = ("ar", "block_diffusion", "sft")
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    objective: str = "ar"
    data: str | None = None
    out: str | None = None
    init: str | None = None
    model_config: str | None = None
    tokenizer: str | None = None
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: str = "cosine"
    lr_warmup: int | None = None
    wsd_decay_frac: float = 0.2
    grad_clip: float = 1.0
    grad_accum: int = 1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    seed: int = 0
    save_every: int = 0
    keep_last: int = 2
    eval_every: int = 0
    eval_batches: int = 4
    resume: bool = False
    block_size: int = 4
    shift: bool = False
    warmup_steps: int | None = None
    u_init: float = 1e-3
    no_warmup: bool = False
    no_clip: bool = False
    no_force_mask: bool = False
    no_loss_weight: bool = False
    fim_rate: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    adapter: str | None = None
    sft_min_eos: int = 1
    sft_max_eos: int = 4
    device: str = "auto"
    precision: str = "auto"
    activation_checkpointing: bool = False
    trim_heap_every: int = 1
    dist: str = "ddp"
    save_dtype: str = "float32"
    quiet: bool = False

    # ------------------------------------------------------------ derived
    @property
    def diffusion(self) -> bool:
        return self.objective in ("block_diffusion", "sft")

    @property
    def corruption_warmup_steps(self) -> int:
        """Default: 10% of the steps for block-diffusion CPT, none for SFT (already a diffusion model)."""
        if self.no_warmup:
            return 0
        if self.warmup_steps is not None:
            return self.warmup_steps
        return self.steps // 10 if self.objective == "block_diffusion" else 0

    @property
    def lora_scale_alpha(self) -> float:
        """LoRA's alpha (the update is scaled by alpha / rank); default 2 x rank."""
        return self.lora_alpha or 2.0 * self.lora_rank

    @property
    def lr_warmup_steps(self) -> int:
        return self.lr_warmup if self.lr_warmup is not None else self.steps // 20

    def validate(self, world: int = 1) -> None:
        """Raise ValueError with the fix for every inconsistent setting."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if not self.data:
            raise ValueError("--data DATADIR is required (build it with `diffcoder data build` / `data sft`)")
        if not self.out:
            raise ValueError("--out RUNDIR is required")
        if bool(self.init) == bool(self.model_config):
            raise ValueError("give exactly one of --init CKPTDIR (continue a checkpoint) or --model-config "
                             "NAME_OR_JSON (new model; then --tokenizer TOKDIR too)")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr-schedule {self.lr_schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.dist not in ("ddp", "fsdp"):
            raise ValueError(f"--dist {self.dist!r}: choose ddp or fsdp")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "block_size", "eval_batches", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len % self.block_size:
            raise ValueError(f"--block-size {self.block_size} does not divide --seq-len {self.seq_len}: blocks are "
                             f"aligned to position 0, so pick a seq-len that is a multiple of {self.block_size}")
        if self.batch_size % (self.grad_accum * world):
            raise ValueError(f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum} x "
                             f"{world} process(es) = {self.grad_accum * world}")
        if not 0.0 < self.u_init <= 1.0:
            raise ValueError(f"--u-init must be in (0, 1], got {self.u_init}")
        if not 0.0 <= self.fim_rate <= 1.0:
            raise ValueError(f"--fim-rate must be in [0, 1], got {self.fim_rate}")
        if self.fim_rate and self.objective == "sft":
            raise ValueError("--fim-rate applies to pretraining data (ar, block_diffusion), not to sft")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if not 0.0 <= self.wsd_decay_frac <= 1.0:
            raise ValueError(f"--wsd-decay-frac must be in [0, 1], got {self.wsd_decay_frac}")
        if self.sft_min_eos < 0 or self.sft_max_eos < self.sft_min_eos:
            raise ValueError("--sft-min-eos/--sft-max-eos: need 0 <= min <= max")
        if self.lora_rank < 0 or self.lora_alpha < 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("--lora-rank and --lora-alpha must be >= 0 and --lora-dropout in [0, 1)")
        if self.adapter and not self.lora_rank:
            raise ValueError("--adapter DIR continues a LoRA run: give --lora-rank too (the adapter's own rank)")
        if self.lora_rank and not self.init:
            raise ValueError("--lora-rank adapts an existing model: give --init CKPTDIR")
        if self.lora_rank and self.dist == "fsdp":
            raise ValueError("--lora-rank with --dist fsdp is not supported: the frozen base is small enough to "
                             "replicate, use --dist ddp")
        for name in ("save_every", "eval_every", "trim_heap_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = off)")


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Keys of a TOML config (dashes or underscores), checked against TrainConfig."""
    import tomllib

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML ({exc})") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            close = difflib.get_close_matches(name, FIELD_TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--config {path}: unknown key {key!r}{hint}; valid keys: {', '.join(FIELD_TYPES)}")
        if isinstance(value, dict):
            raise ValueError(f"--config {path}: key {key!r} is a table; the config is flat key = value pairs")
        out[name] = value
    return out


def make_config(toml_values: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """defaults < TOML < flags, with type checks for TOML values (flags are typed by argparse)."""
    merged = dict(toml_values)
    merged.update(flags)
    defaults = TrainConfig()
    for name, value in toml_values.items():
        default = getattr(defaults, name)
        want = type(default) if default is not None else None
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            merged[name] = float(value) if name not in flags else merged[name]
        elif want is not None and not isinstance(value, want):
            raise ValueError(f"config key {name!r}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return TrainConfig(**merged)
