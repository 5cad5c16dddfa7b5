"""Ship a training run's adapter as diffcoder-0.5b, or keep a run to ship later:

    python runs/diffcoder_05b/release.py RUNDIR STAGE --data DATASET
    python runs/diffcoder_05b/release.py RUNDIR --keep DIR --data DATASET

The first copies RUNDIR/adapter into diffcoder/weights/diffcoder-0.5b in bfloat16 (half the size;
the merge is done in float64 either way), with the decoding defaults, keeps the run's
metrics.jsonl and run.json under runs/diffcoder_05b/train/stage-STAGE/ (a stage is one training
run; a later stage starts from the adapter the earlier one shipped) with data.json naming the
data set it trained on (a folder of this one, e.g. data-2), and records the sha256 that
`diffcoder pull diffcoder-0.5b` must reproduce (building the merged model once from the pulled base).

The second writes the same files into DIR laid out as a run folder (adapter/, final/
generation_config.json, metrics.jsonl, run.json): small enough to commit while a run waits for
its evaluation, and a RUNDIR for the first form later (the adapter's bytes come out the same).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffcoder.hub import ADAPTERS, stamp_adapter
from diffcoder.train.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter

HERE = Path(__file__).resolve().parent
RECORDS = ("metrics.jsonl", "run.json")


def write_adapter(run: Path, dst: Path) -> None:
    """The run's adapter in bfloat16, peft's format, with the pulled base's name; and the decoding defaults."""
    cfg, tensors = read_adapter(run / "adapter")
    dst.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(dst / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg["base_model_name_or_path"] = "qwen2.5-coder-0.5b-instruct"
    cfg["target_modules"] = sorted(cfg["target_modules"])  # peft writes a set, in hash order
    (dst / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# Decoding defaults the model ships with. In-block order leftmost first: at one token per pass it
# costs nothing, and the arms bd4 and bd4-l2r of evaluate.py measure what it gains over the
# release's most-confident-first order.
SHIPPED_DECODING = {"gen_length": 256, "remasking": "left_to_right"}


def generation_config(run: Path) -> str:
    return json.dumps({**json.loads((run / "final" / "generation_config.json").read_text()), **SHIPPED_DECODING},
                      indent=2) + "\n"


def write_records(run: Path, dst: Path, data_set: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in RECORDS:
        shutil.copy(run / name, dst / name)
    (dst / "data.json").write_text(json.dumps({"data_set": data_set}) + "\n")


def keep(run: Path, dst: Path, data_set: str) -> dict:
    write_adapter(run, dst / "adapter")
    (dst / "final").mkdir(parents=True, exist_ok=True)
    (dst / "final" / "generation_config.json").write_text(generation_config(run))
    write_records(run, dst, data_set)
    return {"kept": str(dst)}


def ship(run: Path, stage: Path, data_set: str) -> dict:
    dst = ADAPTERS / "diffcoder-0.5b"
    write_adapter(run, dst)
    (dst / "generation_config.json").write_text(generation_config(run))
    write_records(run, stage, data_set)
    return {"adapter": str(dst), "sha256": stamp_adapter("diffcoder-0.5b")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a training run's --out folder (or a folder --keep wrote)")
    ap.add_argument("stage", nargs="?", type=int, help="ship it: the training stage this run is (1, 2, ...)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="do not ship: write a committable copy of the run here")
    ap.add_argument("--data", required=True, metavar="DATASET",
                    help="the data set the run trained on: a folder of runs/diffcoder_05b (data, data-2, ...)")
    args = ap.parse_args()
    if (args.stage is None) == (args.keep is None):
        ap.error("give STAGE (ship the run) or --keep DIR (keep it to ship later), not both")
    if not (HERE / args.data / "contamination.json").is_file():
        ap.error(f"--data {args.data}: no {HERE / args.data / 'contamination.json'} (name a data set make_data.py wrote)")
    if args.keep:
        print(json.dumps(keep(args.run, args.keep, args.data)))
    else:
        print(json.dumps(ship(args.run, HERE / "train" / f"stage-{args.stage}", args.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
