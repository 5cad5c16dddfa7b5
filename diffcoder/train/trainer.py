"""The training loop: AR pretraining, block-diffusion CPT and SFT; resumable; data parallel.

Determinism is by construction: the rows of step s and their noise are pure functions of
(seed, s), computed for the whole global batch on every rank (each rank then takes its rows of
each micro-batch). A checkpoint therefore needs the model, optimizer, LR
schedule and the step; RNG states are saved and restored as well, for anything else that
might draw from them. Resumed and uninterrupted runs write identical metrics on CPU, and
one process or N processes see the same global batches.

Run directory:
    run.json             resolved settings
    metrics.jsonl        one object per optimizer step
    checkpoints/step-NNNNNNNN/{model/ (HF layout), trainer.pt, state.json}   (atomic, last N kept)
    final/               HF-layout checkpoint (diffcoder.load, transformers.LlamaForCausalLM)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffcoder.fsutil import cpu_has_bf16, replace_dir

from .batches import FimSpec, PretrainStream, SFTStream
from .config import TrainConfig
from .data import PretrainSplit, SFTSplit, read_manifest, tokenizer_fingerprint
from .noise import in_warmup, noise_generator, sample_block_noise, u_max_at
from .objectives import LossModule, eligible_positions
from .parallel import as_float, full_states, grad_sync, is_fsdp, shell_model, wrap

CKPT_DIR = "checkpoints"
# Fields of a metrics record that depend on wall-clock time (excluded when comparing runs).
TIMING_FIELDS = ("tokens_per_s", "step_time_s", "elapsed_s")
# Without a terminal (nohup, CI, a pipe): a plain line for the first step and every LOG_EVERY steps.
LOG_EVERY = 10
# Llama config fields accepted in a --model-config JSON besides ModelConfig's own.
HF_IGNORED_FIELDS = {"hidden_act", "initializer_range", "use_cache", "attention_dropout", "pretraining_tp",
                     "transformers_version", "rope_parameters", "torch_dtype", "dtype"}


# ------------------------------------------------------------------ setup
class DistInfo:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_device(cfg: TrainConfig, d: DistInfo) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine (use cpu or auto)")
    device = torch.device(name)
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
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


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

    from .data import load_tokenizer

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
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-config {path}: not valid JSON ({exc})") from None
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


# ------------------------------------------------------------ checkpoints
def generation_config(cfg: TrainConfig) -> dict[str, Any]:
    """What decoding should default to for what this run trained."""
    if cfg.diffusion:
        return {"block_length": cfg.block_size, "shift": cfg.shift}
    return {"block_length": 1, "shift": True}  # an AR model decodes as block size 1 with shift


def latest_checkpoint(out: Path) -> Path | None:
    # Temporary directories of a save that was killed half-way are never a checkpoint: remove them.
    for tmp in (out / CKPT_DIR).glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    ckpts = sorted(p for p in (out / CKPT_DIR).glob("step-*") if (p / "trainer.pt").exists())
    return ckpts[-1] if ckpts else None


def _rng_states() -> dict[str, Any]:
    """Every RNG's state as tensors, tuples and numbers only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
           "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_states(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(out: Path, model: Any, tok: Any, optim_sd: dict[str, Any], sched: Any, state: dict[str, Any],
                    cfg: TrainConfig, lora: Any = None) -> Path:
    """Write checkpoints/step-N atomically (rank 0): the HF model dir (or, for a LoRA run, the
    adapter dir) + optimizer/scheduler/RNG/step."""
    import diffcoder

    root = out / CKPT_DIR
    root.mkdir(exist_ok=True)
    name = f"step-{state['step']:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        if lora is not None:
            from .adapters import save_adapter

            save_adapter(lora, tmp / "adapter", base=cfg.init)
        else:
            diffcoder.save(model, tmp / "model", tokenizer=tok, generation_config=generation_config(cfg))
        torch.save({"optimizer": optim_sd, "scheduler": sched.state_dict(), "rng": _rng_states(), **state},
                   tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "config": dataclasses.asdict(cfg)}, indent=2) + "\n")
        final = root / name
        replace_dir(tmp, final)  # an existing step-N is moved aside first, never deleted before the swap
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step-*"))[:-cfg.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, loss_mod: Any, opt: torch.optim.Optimizer, sched: Any,
                    lora: Any = None) -> dict[str, Any]:
    """Restore model (or adapter), optimizer, scheduler and RNG states (any world size / parallel mode).
    trainer.pt is read with weights_only=True: a checkpoint holds tensors and plain values, never code."""
    import diffcoder

    from .parallel import load_states

    try:
        blob = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refuses anything but tensors, containers and numbers
        raise ValueError(f"{path / 'trainer.pt'}: not a trainer state this version can read safely ({exc}); "
                         "start a new run or resume from another checkpoint") from None
    if lora is not None:
        from .adapters import load_adapter_weights

        load_adapter_weights(lora, path / "adapter")
        load_states(loss_mod, opt, None, blob["optimizer"])
    else:
        saved = diffcoder.load(path / "model", dtype=torch.float32)
        load_states(loss_mod, opt, saved.state_dict(), blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    _set_rng_states(blob["rng"])
    return {k: blob[k] for k in ("step", "rows", "tokens")}


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (a killed run may have logged past its checkpoint)."""
    from diffcoder.tokenizer import atomic_write_text

    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(l + "\n" for l in keep))


# ------------------------------------------------------------------ loop
class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.d = DistInfo()
        cfg.validate(self.d.world)
        self.out = check_out_dir(cfg) if self.d.main else Path(cfg.out)
        self.device = setup_device(cfg, self.d)
        self.bf16 = use_bf16(cfg, self.device)
        self._load_data()
        self.model, self.tok = build_model(cfg, self.manifest["tokenizer"])
        self.lora = self._add_adapters() if cfg.lora_rank else None
        self._make_streams()
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        self.model.to(self.device).train()
        self.loss_mod = LossModule(self.model, cfg.objective, self.model.mask_id, cfg.block_size, cfg.shift)
        self.wrapped = wrap(self.loss_mod, cfg.dist, self.d.world, self.device)
        self.opt = make_optimizer(self.loss_mod, cfg)  # after sharding: FSDP2 replaces the parameters
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.state = {"step": 0, "rows": 0, "tokens": 0}

    def _add_adapters(self) -> Any:
        """Freeze the model and give it LoRA adapters (new, or continued from --adapter). The frozen
        linear weights are kept in bf16 when training runs in bf16: autocast would cast them on
        every pass anyway, and halving them halves the memory the frozen base takes."""
        from .adapters import add_lora, attach_adapter, read_adapter

        cfg = self.cfg
        if cfg.adapter:
            rank = read_adapter(cfg.adapter)[0]["r"]
            if rank != cfg.lora_rank:
                raise ValueError(f"--adapter {cfg.adapter} has rank {rank}, but --lora-rank is {cfg.lora_rank}")
            lora = attach_adapter(self.model, cfg.adapter)
        else:
            lora = add_lora(self.model, cfg.lora_rank, cfg.lora_scale_alpha, cfg.lora_dropout, cfg.seed)
        if self.bf16:
            for m in self.model.modules():
                if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad:
                    m.weight.data = m.weight.data.to(torch.bfloat16)
        return lora

    def _load_data(self) -> None:
        cfg = self.cfg
        self.manifest = read_manifest(cfg.data)
        kind = self.manifest["kind"]
        if cfg.objective == "sft" and kind != "sft":
            raise ValueError(f"--objective sft needs chat data from `diffcoder data sft`; {cfg.data} is {kind} data")
        if cfg.objective == "block_diffusion" and kind != "pretrain":
            raise ValueError(f"--objective block_diffusion trains on pretraining data; {cfg.data} is {kind} data "
                             "(use --objective sft)")
        tok_info = self.manifest["tokenizer"]
        self.eos_id, self.pad_id = tok_info["eos_id"], tok_info["pad_id"]

    def _make_streams(self) -> None:
        self.train_stream = self._stream("train", shuffle=True)
        self.val_stream = self._stream("validation", shuffle=False) if self.cfg.eval_every else None

    def _fim_spec(self) -> FimSpec | None:
        if not self.cfg.fim_rate:
            return None
        if not self.tok.has_fim:
            raise ValueError("--fim-rate needs a tokenizer with <[fim-prefix]>, <[fim-suffix]>, <[fim-middle]> "
                             "(`diffcoder tokenizer train` adds them)")
        return FimSpec(self.cfg.fim_rate, self.tok.fim_prefix_id, self.tok.fim_suffix_id, self.tok.fim_middle_id,
                       self.tok.eos_id, self.tok.fim_order)

    def _stream(self, split: str, shuffle: bool) -> Any:
        cfg, tok = self.cfg, self.manifest["tokenizer"]
        if self.manifest["kind"] == "sft":
            data = SFTSplit(cfg.data, split, self.manifest)
            if len(data) == 0:
                raise ValueError(f"--data {cfg.data}: the {split} split is empty" +
                                 (" (set --eval-every 0 or rebuild with --val-fraction > 0)" if split != "train" else ""))
            pad = tok["pad_id"] if tok["pad_id"] is not None else tok["eos_id"]
            return SFTStream(data, cfg.seq_len, cfg.seed, tok["eos_id"], pad, cfg.sft_min_eos, cfg.sft_max_eos, shuffle)
        data = PretrainSplit(cfg.data, split, self.manifest)
        if data.tokens == 0:
            raise ValueError(f"--data {cfg.data}: the {split} split is empty" +
                             (" (set --eval-every 0 or rebuild with --val-fraction > 0)" if split != "train" else ""))
        # FIM only on the training rows: validation loss stays comparable across runs with and without it.
        return PretrainStream(data, cfg.seq_len, cfg.seed, shuffle, self._fim_spec() if shuffle else None)

    # -------------------------------------------------------------- batches
    def _global_batch(self, stream: Any, start: int, count: int, step: int, u_max: float, weighted: bool,
                      stream_id: int = 0) -> dict[str, Any]:
        """The whole global batch (tokens, eligibility, noise), identical on every rank and independent
        of how it is split into micro-batches and processes."""
        cfg = self.cfg
        toks, lmask = stream.rows(start, count)
        tokens = torch.from_numpy(toks)
        loss_mask = torch.from_numpy(lmask) if lmask is not None else None
        drop_first = cfg.objective == "ar" or cfg.shift
        elig = eligible_positions(tuple(tokens.shape), loss_mask, drop_first)
        batch = {"tokens": tokens, "eligible": elig}
        if cfg.diffusion:
            gen = noise_generator(cfg.seed, step, 0, stream_id)
            nz = sample_block_noise(tuple(tokens.shape), cfg.block_size, u_max, gen, clip=not cfg.no_clip,
                                    weighted=weighted, force_mask=not cfg.no_force_mask, eligible=elig)
            batch.update(noise_mask=nz.mask, weight=nz.weight, noise=nz)
        return batch

    def _micro(self, batch: dict[str, Any], micro: int, n_micro: int) -> dict[str, torch.Tensor]:
        """This rank's rows of micro-batch `micro`: micro-batches are consecutive row ranges of the
        global batch, and each is split across ranks in consecutive slices."""
        per_micro = batch["tokens"].shape[0] // n_micro
        per_rank = per_micro // self.d.world
        lo = micro * per_micro + self.d.rank * per_rank
        keys = ("tokens", "eligible", "noise_mask", "weight")
        return {k: batch[k][lo:lo + per_rank].to(self.device) for k in keys if k in batch}

    def _autocast(self) -> Any:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ----------------------------------------------------------------- step
    def train_step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        u_max = u_max_at(step, cfg.corruption_warmup_steps, cfg.u_init, not cfg.no_warmup)
        warm = in_warmup(step, cfg.corruption_warmup_steps, not cfg.no_warmup)
        weighted = cfg.diffusion and not warm and not cfg.no_loss_weight
        t0 = time.perf_counter()  # tokens/s counts data loading and noise too
        batch = self._global_batch(self.train_stream, self.state["rows"], cfg.batch_size, step, u_max, weighted)
        n_tokens = int(batch["eligible"].sum())  # the normaliser: eligible tokens of the global batch
        loss_sum = torch.zeros((), device=self.device)
        for m in range(cfg.grad_accum):
            local = self._micro(batch, m, cfg.grad_accum)
            with grad_sync(self.wrapped, self.loss_mod, m == cfg.grad_accum - 1):
                with self._autocast():
                    part = self.wrapped(**local)
                (part * (self.d.world / max(1, n_tokens))).backward()
            loss_sum += part.detach().float()
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = as_float(torch.nn.utils.clip_grad_norm_(self.loss_mod.parameters(), clip))
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.d.world > 1:
            dist.all_reduce(loss_sum)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_tokens = cfg.batch_size * cfg.seq_len
        self.state["rows"] += cfg.batch_size
        self.state["tokens"] += step_tokens
        self.state["step"] = step + 1
        rec = {"step": step + 1, "loss": float(loss_sum) / max(1, n_tokens), "grad_norm": grad_norm,
               "lr": lr, "tokens": self.state["tokens"], "tokens_per_s": step_tokens / dt, "step_time_s": dt}
        if cfg.diffusion:
            rec.update(self._noise_stats(batch, u_max, weighted))
        return rec

    @staticmethod
    def _noise_stats(batch: dict[str, Any], u_max: float, weighted: bool) -> dict[str, Any]:
        nz = batch["noise"]
        blocks = int(nz.eligible_blocks.sum())
        has_mask = batch["noise_mask"].reshape(nz.u_blk.shape[0], nz.u_blk.shape[1], -1).any(-1)
        # Blocks that carry no loss in the corruption actually used (0 whenever the fallback is on),
        # and blocks that drew no mask before the fallback (the waste clipping reduces).
        empty = int((nz.eligible_blocks & ~has_mask).sum())
        raw_zero = int(nz.zero_before_fallback.sum())
        return {"u_max": u_max, "weighted": weighted,
                "mask_rate": int(batch["noise_mask"].sum()) / max(1, int(batch["eligible"].sum())),
                "zero_mask_block_frac": empty / max(1, blocks), "raw_zero_block_frac": raw_zero / max(1, blocks)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over a fixed set of held-out rows and fixed noise (u_max = 1)."""
        cfg = self.cfg
        self.loss_mod.eval()
        micro = cfg.batch_size // cfg.grad_accum
        total, n = 0.0, 0
        weighted = cfg.diffusion and not cfg.no_loss_weight
        for i in range(cfg.eval_batches):
            batch = self._global_batch(self.val_stream, i * micro, micro, i, 1.0, weighted, stream_id=1)
            local = {k: v.to(self.device) for k, v in batch.items() if k in ("tokens", "eligible", "noise_mask", "weight")}
            with self._autocast():
                total += float(self.loss_mod(**local))
            n += int(batch["eligible"].sum())
        self.loss_mod.train()
        return total / max(1, n)

    def run(self) -> Path:
        cfg, out = self.cfg, self.out
        metrics = out / "metrics.jsonl"
        if cfg.resume and (ck := latest_checkpoint(out)) is not None:
            self.state = load_checkpoint(ck, self.loss_mod, self.opt, self.sched, self.lora)
        if self.d.main:
            truncate_metrics(metrics, self.state["step"]) if cfg.resume else metrics.unlink(missing_ok=True)
            from diffcoder.tokenizer import atomic_write_text

            atomic_write_text(out / "run.json", json.dumps({**dataclasses.asdict(cfg), "world_size": self.d.world,
                                                            "device": str(self.device), "bf16": self.bf16}, indent=2) + "\n")
        self._barrier()
        # Fault injection for the resume tests: SIGKILL this process right after step N is logged.
        kill_at = int(os.environ.get("DIFFCODER_TRAIN_KILL_AFTER_STEP", "0"))
        started, first = time.perf_counter(), self.state["step"] + 1
        with self._progress() as bar, open(metrics, "a") if self.d.main else nullcontext() as fh:
            task = bar.add_task("train", total=cfg.steps, completed=self.state["step"], info="")
            for step in range(self.state["step"], cfg.steps):
                rec = self.train_step(step)
                if not math.isfinite(rec["loss"]):
                    raise ValueError(f"loss became {rec['loss']} at step {step + 1}; lower --lr or check data")
                done = step + 1
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    rec["val_loss"] = self.evaluate()
                if self.d.main:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                bar.update(task, completed=done, info=f"loss {rec['loss']:.4f}  {rec['tokens_per_s']:.0f} tok/s")
                if not bar.console.is_terminal and (done == first or done % LOG_EVERY == 0 or done == cfg.steps):
                    self._log_step(rec, started)
                if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
                    self._save()  # the last step too: a finished run resumes as a no-op or extends
                if kill_at and done == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        final = out / "final"
        model, _ = self._full_model(need_optimizer=False)
        if self.d.main:
            import diffcoder

            if self.lora is not None:
                from .adapters import merge, save_adapter

                save_adapter(self.lora, out / "adapter", base=cfg.init)
                model.float()  # merge in float32 (the frozen bf16 weights widen exactly)
                model = merge(self.lora)
            diffcoder.save(model, final, tokenizer=self.tok, dtype=cfg.save_dtype,
                           generation_config=generation_config(cfg))
            self._report(metrics, final, started)
        self._barrier()
        return final

    def _full_model(self, need_optimizer: bool) -> tuple[Any, dict[str, Any] | None]:
        """(a module with the full weights, full optimizer state): a collective under FSDP2."""
        if not is_fsdp(self.loss_mod):
            optim_sd = full_states(self.loss_mod, self.opt)[1] if need_optimizer else None
            return self.model, optim_sd
        model_sd, optim_sd = full_states(self.loss_mod, self.opt)
        if not self.d.main:
            return None, None
        return shell_model(self.model.config, model_sd, self.tok, self.model.mask_id), optim_sd

    def _save(self) -> None:
        model, optim_sd = self._full_model(need_optimizer=True)
        if self.d.main:
            save_checkpoint(self.out, model, self.tok, optim_sd, self.sched, dict(self.state), self.cfg, self.lora)
        self._barrier()

    def _barrier(self) -> None:
        if self.d.world > 1:
            dist.barrier()

    def _progress(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=self.cfg.quiet or not self.d.main)

    def _log_step(self, rec: dict[str, Any], started: float) -> None:
        if self.cfg.quiet or not self.d.main:
            return
        val = f"  val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
        print(f"step {rec['step']}/{self.cfg.steps}  loss {rec['loss']:.4f}{val}  lr {rec['lr']:.3g}  "
              f"{rec['tokens_per_s']:.0f} tok/s  elapsed {_hms(time.perf_counter() - started)}", flush=True)

    def _report(self, metrics: Path, final: Path, started: float) -> None:
        """The end-of-run summary: what was trained, the last losses, and where everything is."""
        recs = []
        for line in metrics.read_text().splitlines() if metrics.exists() else []:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        last = recs[-1] if recs else {}
        val = next((r for r in reversed(recs) if "val_loss" in r), None)
        cfg = self.cfg
        lines = [
            f"done: {cfg.objective}" + (f" from {cfg.init}" if cfg.init else "") + (" (LoRA)" if self.lora else ""),
            f"  steps      {self.state['step']}  ({self.state['tokens']:,} tokens)",
            f"  wall time  {_hms(time.perf_counter() - started)} (this run)",
            f"  loss       {last['loss']:.4f}" if "loss" in last else "  loss       -",
            f"  val loss   {val['val_loss']:.4f} (step {val['step']})" if val else
            "  val loss   - (set --eval-every N to measure it)",
            f"  metrics    {metrics}",
            f"  model      {final}",
            f"  plot       diffcoder plot {self.out} --out {self.out / 'curves.png'}",
        ]
        print("\n".join(lines), flush=True)

    def close(self) -> None:
        if self.d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train(cfg: TrainConfig) -> Path:
    """Run training end to end; returns RUNDIR/final."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
