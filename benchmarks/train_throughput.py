"""Training tokens/s of `ar` vs `block_diffusion` on the same model (full optimizer steps).

Block diffusion runs the noisy and the clean copy through one forward (2L tokens per L-token
sequence), so about half the AR rate is the expectation; the vocabulary projection runs
only on positions that carry loss in both objectives. With `--prompt-share F` the first F of
each row is an SFT prompt (never masked, no loss): block diffusion then copies only the blocks
holding a masked position, and a third arm times the same loss with a copy of every block (the
baseline). Prints one JSON line per measurement and, last, the ratio bd/ar for the largest
model as JSON.

    .venv/bin/python benchmarks/train_throughput.py [--models tiny,10m] [--seq-len 256] [--batch 8]
                                                    [--prompt-share 0.25]
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
from diffcoder.train.objectives import LossModule, block_diffusion_loss_sum, eligible_positions

MODELS = {name: {**PRESETS[name], "vocab_size": 4096} for name in ("tiny", "10m")}
# The mask id of our tokenizer layout (Seed-Coder's), looked up by name.
MASK_ID, B = SPECIAL_TOKENS.index(MASK_TOKEN), 4


ARMS = ("ar", "block_diffusion", "block_diffusion_every_block")


def step_fn(model: DiffCoderLM, arm: str, batch: int, seq_len: int, device: torch.device, bf16: bool,  # noqa: ANN201
            prompt_share: float = 0.0):
    objective = "ar" if arm == "ar" else "block_diffusion"
    loss_mod = LossModule(model, objective, MASK_ID, B, shift=False)
    every_block = arm == "block_diffusion_every_block"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(7, model.config.vocab_size, (batch, seq_len), generator=gen)
    prompt = torch.arange(seq_len).expand(batch, seq_len) < int(prompt_share * seq_len)
    elig = eligible_positions((batch, seq_len), ~prompt, drop_first=objective == "ar")
    step = [0]

    def run() -> float:
        kw = {"tokens": tokens.to(device), "eligible": elig.to(device)}
        if objective != "ar":
            nz = sample_block_noise((batch, seq_len), B, 1.0, noise_generator(0, step[0], 0), eligible=elig)
            kw.update(noise_mask=nz.mask.to(device), weight=nz.weight.to(device))
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if every_block:
                loss = block_diffusion_loss_sum(model, kw["tokens"], kw["noise_mask"], kw["weight"], MASK_ID, B,
                                                every_block=True)
            else:
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
    ap.add_argument("--prompt-share", type=float, default=0.0,
                    help="leading share of each row that is an SFT prompt (no loss); > 0 adds the every-block arm")
    args = ap.parse_args()
    if not 0 <= args.prompt_share < 1:
        raise SystemExit("--prompt-share must be in [0, 1)")
    device = torch.device(pick_device(args.device))
    bf16 = pick_dtype(args.precision, device) == torch.bfloat16
    ratio = None
    for name in args.models.split(","):
        cfg = ModelConfig(**MODELS[name], mask_token_id=MASK_ID)
        runs = {}
        for arm in ARMS if args.prompt_share > 0 else ARMS[:2]:
            model = DiffCoderLM(cfg).init_weights(0).to(device).train()
            runs[arm] = step_fn(model, arm, args.batch, args.seq_len, device, bf16, args.prompt_share)
            runs[arm]()
            runs[arm]()
        times: dict[str, list[float]] = {arm: [] for arm in runs}
        for _ in range(args.steps):  # interleaved, so load changes on a shared machine hit every arm alike
            for arm in times:
                times[arm].append(runs[arm]())
        tps = {arm: args.batch * args.seq_len / statistics.median(t) for arm, t in times.items()}
        ratio = tps["block_diffusion"] / tps["ar"]
        every = ({"prompt_share": args.prompt_share,
                  "bd_every_block_tokens_per_s": round(tps["block_diffusion_every_block"]),
                  "bd_over_every_block": round(tps["block_diffusion"] / tps["block_diffusion_every_block"], 3)}
                 if "block_diffusion_every_block" in tps else {})
        print(json.dumps({"model": name, "params_m": round(cfg.num_parameters / 1e6, 2), "device": str(device),
                          "bf16": bf16, "threads": torch.get_num_threads(), "batch": args.batch,
                          "seq_len": args.seq_len, "ar_tokens_per_s": round(tps["ar"]),
                          "bd_tokens_per_s": round(tps["block_diffusion"]), "ratio": round(ratio, 3), **every}))
    print(json.dumps({"name": "train_throughput", "command": "python " + " ".join(sys.argv),
                      "bd_over_ar_tokens_per_s": round(ratio, 3)}))


if __name__ == "__main__":
    main()
