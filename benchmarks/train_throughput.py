"""Training tokens/s of `ar` vs `block_diffusion` on the same model (full optimizer steps).

Block diffusion runs the noisy and the clean copy through one forward (2L tokens per L-token
sequence), so about half the AR rate is the expectation; the vocabulary projection runs
only on positions that carry loss in both objectives. Prints one JSON line per measurement and,
last, the ratio bd/ar for the largest model as JSON.

    .venv/bin/python benchmarks/train_throughput.py [--models tiny,10m] [--seq-len 256] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from diffcoder.config import PRESETS, ModelConfig
from diffcoder.hardware import pick_device, pick_dtype
from diffcoder.model import DiffCoderLM
from diffcoder.tokenizer import MASK_TOKEN, SPECIAL_TOKENS
from diffcoder.train.noise import noise_generator, sample_block_noise
from diffcoder.train.objectives import LossModule, eligible_positions

MODELS = {name: {**PRESETS[name], "vocab_size": 4096} for name in ("tiny", "10m")}
# The mask id of our tokenizer layout (Seed-Coder's), looked up by name.
MASK_ID, B = SPECIAL_TOKENS.index(MASK_TOKEN), 4


def step_fn(model: DiffCoderLM, objective: str, batch: int, seq_len: int, device: torch.device, bf16: bool):  # noqa: ANN201
    loss_mod = LossModule(model, objective, MASK_ID, B, shift=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(7, model.config.vocab_size, (batch, seq_len), generator=gen)
    elig = eligible_positions((batch, seq_len), None, drop_first=objective == "ar")
    step = [0]

    def run() -> float:
        kw = {"tokens": tokens.to(device), "eligible": elig.to(device)}
        if objective != "ar":
            nz = sample_block_noise((batch, seq_len), B, 1.0, noise_generator(0, step[0], 0))
            kw.update(noise_mask=nz.mask.to(device), weight=nz.weight.to(device))
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_mod(**kw)
        (loss / int(elig.sum())).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step[0] += 1
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,10m", help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per objective (after 2 warm-up steps)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast dtype")
    args = ap.parse_args()
    device = torch.device(pick_device(args.device))
    bf16 = pick_dtype(args.precision, device) == torch.bfloat16
    ratio = None
    for name in args.models.split(","):
        cfg = ModelConfig(**MODELS[name], mask_token_id=MASK_ID)
        runs = {}
        for obj in ("ar", "block_diffusion"):
            model = DiffCoderLM(cfg).init_weights(0).to(device).train()
            runs[obj] = step_fn(model, obj, args.batch, args.seq_len, device, bf16)
            runs[obj]()
            runs[obj]()
        times: dict[str, list[float]] = {"ar": [], "block_diffusion": []}
        for _ in range(args.steps):  # interleaved, so load changes on a shared machine hit both alike
            for obj in times:
                times[obj].append(runs[obj]())
        tps = {obj: args.batch * args.seq_len / statistics.median(t) for obj, t in times.items()}
        ratio = tps["block_diffusion"] / tps["ar"]
        print(json.dumps({"model": name, "params_m": round(cfg.num_parameters / 1e6, 2), "device": str(device),
                          "bf16": bf16, "threads": torch.get_num_threads(), "batch": args.batch,
                          "seq_len": args.seq_len, "ar_tokens_per_s": round(tps["ar"]),
                          "bd_tokens_per_s": round(tps["block_diffusion"]), "ratio": round(ratio, 3)}))
    print(json.dumps({"name": "train_throughput", "command": "python " + " ".join(sys.argv),
                      "bd_over_ar_tokens_per_s": round(ratio, 3)}))


if __name__ == "__main__":
    main()
