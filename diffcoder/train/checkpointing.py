"""Trainer checkpoints: checkpoints/step-N published as one staged directory (the model or the
adapter, optimizer, LR schedule, RNG states, step), the latest one found again, and a resumed run's
metrics cut back to its checkpoint. trainer.pt is read with weights_only=True."""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcoder.fsutil import atomic_write_text, remove_stale_staging, staged_dir

from .config import TrainConfig

CKPT_DIR = "checkpoints"


def generation_config(cfg: TrainConfig) -> dict[str, Any]:
    """What decoding should default to for what this run trained."""
    if cfg.diffusion:
        return {"block_length": cfg.block_size, "shift": cfg.shift}
    return {"block_length": 1, "shift": True}  # an AR model decodes as block size 1 with shift


def latest_checkpoint(out: Path) -> Path | None:
    # Temporary directories of a save that was killed half-way are never a checkpoint: remove them.
    remove_stale_staging(out / CKPT_DIR, "step-*")
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
    final = root / f"step-{state['step']:08d}"
    with staged_dir(final) as tmp:  # an existing step-N stays until the new one is complete
        if lora is not None:
            from .adapters import save_adapter

            save_adapter(lora, tmp / "adapter", base=cfg.init)
        else:
            diffcoder.save(model, tmp / "model", tokenizer=tok, generation_config=generation_config(cfg))
        torch.save({"optimizer": optim_sd, "scheduler": sched.state_dict(), "rng": _rng_states(), **state},
                   tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "config": dataclasses.asdict(cfg)}, indent=2) + "\n")
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
