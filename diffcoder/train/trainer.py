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
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diffcoder.fsutil import atomic_write_text
from diffcoder.hardware import release_free_heap

from .batches import FimSpec, PretrainStream, SFTStream
from .checkpointing import generation_config, latest_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from .config import TrainConfig
from .datadir import read_manifest
from .noise import in_warmup, noise_generator, sample_block_noise, u_max_at
from .objectives import LossModule, eligible_positions
from .parallel import as_float, full_states, grad_sync, is_fsdp, shell_model, wrap
from .setup import DistInfo, build_model, check_out_dir, lr_lambda, make_optimizer, setup_device, use_bf16
from .sft_data import SFTSplit
from .shards import PretrainSplit

# Fields of a metrics record that depend on wall-clock time (excluded when comparing runs).
TIMING_FIELDS = ("tokens_per_s", "step_time_s", "elapsed_s")
# Without a terminal (nohup, CI, a pipe): a plain line for the first step and every LOG_EVERY steps.
LOG_EVERY = 10


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
        if cfg.trim_heap_every and (step + 1) % cfg.trim_heap_every == 0:
            release_free_heap()
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
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

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
