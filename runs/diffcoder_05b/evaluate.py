"""Evaluate every arm of diffcoder-0.5b through our own harness, same prompts and settings:

    python runs/diffcoder_05b/evaluate.py [--bench humaneval mbpp humaneval-infill-single] [--arms ...]
                                          [--ar-sft OUT/stage-4/final] [--ablations OUT]

Each arm x benchmark goes to runs/diffcoder_05b/results/ARM/BENCH (resumable: rerun to continue);
`report.py` turns them into the tables of the model card and docs/replication.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BASE, MODEL = "qwen2.5-coder-0.5b-instruct", "diffcoder-0.5b"
GEN = ["--gen-length", "384", "--stop-after-code"]
# Single-line infilling: the answer is one line, never a chat reply with a code block.
GEN_INFILL = ["--gen-length", "64"]
# Arms with model None are not shipped: train_ar_sft.sh builds the AR-SFT arm (`--ar-sft` points at
# it) and train_ablations.sh the one-setting ablations of stage 1 (`--ablations OUT`: OUT/ARM/final).
# name -> (model, decoder flags, what the arm is)
AR = ["--block-length", "1", "--shift"]
CONF = ["--block-length", "4", "--shift", "--remasking", "low_confidence"]  # most confident position first
L2R = ["--block-length", "4", "--shift", "--remasking", "left_to_right"]  # leftmost masked position first
ARMS: dict[str, tuple[str | None, list[str], str]] = {
    "ar-base": (BASE, AR, "the AR base, AR decoding"),
    "ar-sft": (None, AR, "the AR base after AR SFT on the same data and schedule as diffcoder-0.5b, AR decoding"),
    "base-bd4": (BASE, ["--block-length", "4", "--shift"], "the AR base decoded as block diffusion (B = 4), untrained"),
    "bd4": (MODEL, CONF, "diffcoder-0.5b, B = 4, one token per pass, most confident position first"),
    "bd4-t0.9": (MODEL, [*CONF, "--threshold", "0.9"], "diffcoder-0.5b, threshold 0.9"),
    "bd4-t0.7": (MODEL, [*CONF, "--threshold", "0.7"], "diffcoder-0.5b, threshold 0.7"),
    "bd4-l2r": (MODEL, L2R, "diffcoder-0.5b, B = 4, one token per pass, leftmost masked position first"),
    "bd4-l2r-t0.9": (MODEL, [*L2R, "--threshold", "0.9"],
                     "diffcoder-0.5b, leftmost first, threshold 0.9 (the leftmost plus the confident run after it)"),
    "bd4-l2r-spec": (MODEL, [*L2R, "--speculative"],
                     "diffcoder-0.5b, leftmost first, speculative (each pass also verifies the last pass's drafts: "
                     "the tokens of one token per pass)"),
    "bd4-pipe": (MODEL, [*CONF, "--threshold", "0.9", "--max-active-blocks", "2", "--block-add-threshold", "0.5"],
                 "diffcoder-0.5b, threshold 0.9, two blocks in flight"),
    # The ablations, at stage 1's budget: each is decoded like bd4-l2r (the shipped default).
    "s1": (None, L2R, "stage 1 alone (LoRA, logit shift kept, corruption warmup): the ablations' reference"),
    "s1-full": (None, L2R, "stage 1 with full fine-tuning instead of LoRA"),
    "s1-noshift": (None, [f for f in L2R if f != "--shift"],
                   "stage 1 with the logit shift dropped (the paper's choice)"),
    "s1-nowarmup": (None, L2R, "stage 1 without the corruption warmup"),
}
ABLATIONS = {"s1": "s1", "s1-full": "full", "s1-noshift": "noshift", "s1-nowarmup": "nowarmup"}  # arm -> OUT/ folder
# FIM: the instruct template is not used; infilling takes the model's own FIM tokens.
INFILL_ARMS = {"ar-base", "ar-sft", "base-bd4", "bd4", "bd4-l2r"}


def runs_on(arm: str, bench: str) -> bool:
    """Whether ARM is evaluated on BENCH (infilling only for INFILL_ARMS)."""
    return not bench.startswith("humaneval-infill") or arm in INFILL_ARMS


def complete(out: Path) -> bool:
    res = out / "results.json"
    return res.exists() and json.loads(res.read_text()).get("complete", False)


def run(arm: str, bench: str, limit: int | None, batch: int, model: str | None, asked: bool) -> int:
    """Evaluate one arm on one benchmark; `asked`: named on the command line (an arm that cannot run
    is then an error, not a skip)."""
    _, flags, _ = ARMS[arm]
    out = RESULTS / arm / bench
    if model is None:
        if complete(out):
            print(f"{arm}/{bench}: complete, and no model given to resume it with: kept", flush=True)
            return 0
        how = ("runs/diffcoder_05b/train_ablations.sh and pass --ablations OUT" if arm in ABLATIONS
               else "runs/diffcoder_05b/train_ar_sft.sh and pass --ar-sft OUT/stage-4/final")
        msg = f"{arm}/{bench}: not evaluated yet and this arm's weights are not shipped: build them with {how}"
        if asked:
            raise SystemExit(msg)
        print(f"{msg} (skipped)", flush=True)
        return 0
    cmd = [sys.executable, "-m", "diffcoder.cli", "eval", bench, "--model", model, "--out", str(out),
           "--batch-size", str(batch), *(GEN_INFILL if bench.startswith("humaneval-infill") else GEN), *flags,
           "--no-progress"]
    if limit:
        cmd += ["--limit", str(limit)]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", nargs="+", default=["humaneval", "mbpp"])
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all (an unshipped arm with neither "
                    "results nor weights given is skipped)")
    ap.add_argument("--limit", type=int, help="first N problems only (a documented subset)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ar-sft", metavar="DIR", help="the AR-SFT arm's merged model (train_ar_sft.sh OUT/stage-4/final)")
    ap.add_argument("--ablations", metavar="OUT", help="train_ablations.sh's OUT (OUT/ARM/final for the s1* arms)")
    args = ap.parse_args()
    models = {arm: model for arm, (model, _, _) in ARMS.items()} | {"ar-sft": args.ar_sft}
    if args.ablations:  # the arms train_ablations.sh has built
        models |= {arm: str(final) for arm, sub in ABLATIONS.items()
                   if (final := Path(args.ablations) / sub / "final").is_dir()}
    for bench in args.bench:
        for arm in args.arms or list(ARMS):
            if not runs_on(arm, bench):
                continue
            if run(arm, bench, args.limit, args.batch_size, models[arm], asked=bool(args.arms)):
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
