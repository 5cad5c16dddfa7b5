"""Ship a training run's adapter as diffcoder-0.5b:

    python runs/diffcoder_05b/release.py RUNDIR STAGE

Copies RUNDIR/adapter into diffcoder/weights/diffcoder-0.5b in bfloat16 (half the size; the merge
is done in float64 either way), with the decoding defaults, keeps the run's metrics.jsonl and
run.json under runs/diffcoder_05b/train/stage-STAGE/ (a stage is one training run; a later stage
starts from the adapter the earlier one shipped), and records the sha256 that `diffcoder pull diffcoder-0.5b`
must reproduce (building the merged model once from the pulled base).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffcoder.hub import ADAPTERS, stamp_adapter
from diffcoder.train.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter

HERE = Path(__file__).resolve().parent


def main() -> int:
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        raise SystemExit("usage: release.py RUNDIR STAGE  (STAGE: 1, 2, ...: the training stage this run is)")
    run, stage = Path(sys.argv[1]), HERE / "train" / f"stage-{sys.argv[2]}"
    cfg, tensors = read_adapter(run / "adapter")
    dst = ADAPTERS / "diffcoder-0.5b"
    dst.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(dst / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg["base_model_name_or_path"] = "qwen2.5-coder-0.5b-instruct"
    (dst / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {**json.loads((run / "final" / "generation_config.json").read_text()), "gen_length": 256}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    stage.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "run.json"):
        shutil.copy(run / name, stage / name)
    print(json.dumps({"adapter": str(dst), "sha256": stamp_adapter("diffcoder-0.5b")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
