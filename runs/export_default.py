"""Export the SFT stage of runs/default_model.sh as the shipped `diffcoder-tiny` (bfloat16), measure
it, and write MODEL_CARD.md beside the weights. Every number in the card is printed here.

    .venv/bin/python runs/export_default.py --run runs/out/default --out diffcoder/weights/diffcoder-tiny
    .venv/bin/python runs/export_default.py ... --card-only   # keep the weights, re-measure, rewrite the card
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import eval_bench  # runs/common.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))  # measure.py: the machine's name in reports
STAGES = (("ar", "AR pretraining (10% FIM rows), constant LR: the pre-annealing checkpoint", "default-ar.toml"),
          ("cpt", "block-diffusion CPT, B = 4, corruption warmup, block-wise clipped noise", "default-cpt.toml"),
          ("sft", "SFT, block-diffusion objective, 1-4 random EOS per sample", "default-sft.toml"))
GENERATION = {"gen_length": 128, "steps": 128, "block_length": 4, "shift": False}
SPEED_TASKS = 40  # per kind, batch 1
SPEED_MODES = {"exact (1 token/pass)": {}, "threshold 0.9": {"threshold": 0.9}, "threshold 0.7": {"threshold": 0.7},
               "threshold 0.9 + 2-block pipelining": {"threshold": 0.9, "max_active_blocks": 2}}


def speed_modes() -> dict[str, Any]:
    from diffcoder.eval.heldout import DecodeStyle
    return {name: DecodeStyle("block", **kw) for name, kw in SPEED_MODES.items()}
LICENCES = {"stdlib": ("Python standard library", "PSF-2.0"), "yaml": ("python3-yaml examples (Debian)", "MIT")}


def source_rows(manifest: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, version, licence) for each corpus source, licences read from package metadata."""
    import sysconfig

    dists = md.packages_distributions()
    rows = []
    for src in manifest["sources"]:
        p = Path(src)
        if str(p) == sysconfig.get_paths()["stdlib"]:
            rows.append((LICENCES["stdlib"][0], platform.python_version(), LICENCES["stdlib"][1]))
        elif "python3-yaml" in str(p):
            rows.append((LICENCES["yaml"][0], "", LICENCES["yaml"][1]))
        else:
            dist = (dists.get(p.name) or [p.name])[0]
            meta = md.metadata(dist)
            lic = meta.get("License-Expression") or (meta.get("License") or "").splitlines()[0:1]
            lic = lic if isinstance(lic, str) else (lic[0] if lic else "")
            if not lic:
                lic = ", ".join(c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if "License ::" in c)
            rows.append((f"`{p.name}` ({dist})", meta["Version"], lic))
    return rows


def stage_stats(run: Path) -> dict[str, Any]:
    from diffcoder.train.plot import read_metrics

    recs = read_metrics(run)
    last = recs[-1]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    return {"steps": last["step"], "tokens": last["tokens"], "seconds": sum(r.get("step_time_s", 0.0) for r in recs),
            "final_loss": last["loss"], "val_loss": vals[-1] if vals else None}


def measure(out: Path, run: Path, n_tasks: int, bench_limit: int | None = None) -> dict[str, Any]:
    """Held-out exact match, HumanEval / MBPP pass@1 and the timings, on the exported files."""
    from diffcoder.eval.heldout import DecodeStyle, make_tasks, run_tasks
    from diffcoder.engine.cli import load_auto

    tasks = make_tasks(run / "data", n_tasks, seed=0)
    res: dict[str, Any] = {"heldout": run_tasks(load_auto(out, device="cpu"), tasks, DecodeStyle("block"),
                                                keep_records=False)}
    for bench in ("humaneval", "mbpp"):
        edir = run / "eval" / f"{bench}-shipped"
        shutil.rmtree(edir, ignore_errors=True)  # the eval resumes from an OUTDIR: start clean
        res[bench] = eval_bench(out, bench, edir, ["--gen-length", "256"], bench_limit)
    return res | measure_speed(out, run, n_tasks)


def measure_speed(out: Path, run: Path, n_tasks: int) -> dict[str, Any]:
    """Batch-1 exact decoding against the approximate modes, and the CLI's wall time: the timing
    half of the measurements (rerun alone on a quiet machine with --remeasure-speed)."""
    from diffcoder.eval.heldout import first_per_kind, make_tasks, run_tasks
    from diffcoder.engine.cli import load_auto

    model = load_auto(out, device="cpu")
    subset = first_per_kind(make_tasks(run / "data", n_tasks, seed=0), SPEED_TASKS)  # the draw of measure()
    res: dict[str, Any] = {f"speed/{name}": run_tasks(model, subset, style, batch_size=1, keep_records=False)
                           for name, style in speed_modes().items()}  # batch 1: tokens per pass is per row
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffcoder.cli", "generate", "--model", str(out), "def fibonacci(n):"],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    res["cli_seconds"] = time.perf_counter() - t0
    res["cli_output"] = proc.stdout
    return res


def write_card(out: Path, run: Path, m: dict[str, Any]) -> None:
    import torch

    import diffcoder
    from diffcoder.eval.heldout import KINDS
    from diffcoder.fsutil import atomic_write_text
    from measure import hardware_name  # benchmarks/measure.py

    model = diffcoder.load(out)
    c = model.config
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    stats = {name: stage_stats(run / name) for name, _, _ in STAGES}
    total_s = sum(s["seconds"] for s in stats.values())
    size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    L = [
        "# diffcoder-tiny",
        "",
        "The default model of diffcoder: a small Llama-architecture block-diffusion code model trained",
        "from scratch by this repository's own pipeline (`runs/default_model.sh`), following",
        "Stable-DiffCoder's path at toy scale. It makes every command work out of the box and shows",
        "the mechanics; it is **not** a useful coding assistant (see *What it cannot do*).",
        "",
        "## Architecture",
        f"- Llama family: {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size},",
        f"  {c.num_attention_heads} query / {c.num_key_value_heads} key-value heads, RoPE theta {c.rope_theta:g},",
        f"  tied embeddings, vocabulary {c.vocab_size} (byte-level code BPE trained on the corpus).",
        f"- {c.num_parameters / 1e6:.2f} M parameters; weights in bfloat16, {size_mb:.1f} MB.",
        f"- Special ids from the tokenizer: mask {model.mask_id}, EOS {c.eos_token_id}, BOS {c.bos_token_id};"
        " FIM tokens in suffix-prefix-middle order; a chat template (Seed-Coder style).",
        "",
        "## Training (all on one CPU)",
        f"Hardware: {hardware_name(torch.device('cpu')).rsplit(' (', 1)[0]}, {os.cpu_count()} cores, bf16 autocast. Wall time below is the sum of",
        "optimizer-step times from each stage's `metrics.jsonl` (evaluation and checkpointing excluded).",
        "",
        "| stage | what | steps | tokens seen | wall time | final train loss | final val loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, what, cfg in STAGES:
        s = stats[name]
        val = f"{s['val_loss']:.3f}" if s["val_loss"] is not None else "n/a"
        L.append(f"| {name} (`runs/configs/{cfg}`) | {what} | {s['steps']} | {s['tokens'] / 1e6:.2f} M | "
                 f"{s['seconds'] / 60:.1f} min | {s['final_loss']:.3f} | {val} |")
    L += [f"| all | | | {sum(s['tokens'] for s in stats.values()) / 1e6:.2f} M | {total_s / 60:.1f} min | | |", "",
          "CPT and SFT losses are block-diffusion losses: the cross entropy at masked tokens only, weighted",
          "1/u_blk (the block's clipped masking rate) after the corruption warmup and 1 during it, divided",
          "by the number of eligible tokens as the AR loss is. Same unit (nats per token), different",
          "quantity (a masked-diffusion bound, not the next-token NLL): they are not comparable with the AR",
          "stage's numbers (docs/training.md, *Objectives*).", "",
          "## Data and licences",
          f"Pretraining: {manifest['splits']['train']['files']} Python files, "
          f"{manifest['splits']['train']['tokens'] / 1e6:.2f} M tokens; "
          f"{manifest['splits']['validation']['files']} files ({manifest['splits']['validation']['tokens'] / 1e6:.2f} M tokens) "
          "held out by content hash and never trained on. Files marked as generated, minified,",
          "binary or duplicate were skipped.", "",
          "| source | version | licence |", "| --- | --- | --- |"]
    L += [f"| {a} | {b} | {lic} |" for a, b, lic in source_rows(manifest)]
    sft_m = json.loads((run / "sft-data" / "manifest.json").read_text())
    L += ["",
          f"SFT: {sft_m['splits']['train']['samples']} conversations built offline by `diffcoder data sft-synth`: a",
          "documented function's signature and docstring as the instruction, the whole function as the",
          "answer; only files of the training split. No benchmark problem is in any of the data.", "",
          "## Decoding defaults (`generation_config.json`)",
          f"Block diffusion, block length {GENERATION['block_length']}, no logit shift, "
          f"{GENERATION['gen_length']} new tokens, one token per forward pass (steps = gen_length),",
          "greedy low-confidence remasking, stop at EOS. `--threshold 0.9` decodes several tokens per pass",
          "(see docs/replication.md (d) for what that costs in quality).", "",
          "## Measured (by `runs/export_default.py`, on the exported bfloat16 files)", "",
          f"Held-out tasks ({m['heldout'][KINDS[0]]['n']} per kind, the tasks of docs/replication.md; completion "
          "prompts and FIM), % ± standard error:", "",
          "| metric | " + " | ".join(KINDS) + " |", "| --- | " + " | ".join("---" for _ in KINDS) + " |",
          "| exact match | " + " | ".join(f"{100 * m['heldout'][k]['exact_match']:.1f} ± {100 * m['heldout'][k]['stderr']:.1f}"
                                          for k in KINDS) + " |",
          "| edit similarity | " + " | ".join(f"{100 * m['heldout'][k]['edit_similarity']:.1f} ± "
                                              f"{100 * m['heldout'][k]['edit_similarity_stderr']:.1f}" for k in KINDS) + " |",
          ""]
    L += [f"Exact decoding against the approximate modes, batch 1, first {SPEED_TASKS} tasks of each kind "
          "(exact match %, edit similarity %, generated tokens per forward pass, ms per token):", "",
          "| decoding | " + " | ".join(KINDS) + " |", "| --- | " + " | ".join("---" for _ in KINDS) + " |"]
    for name in SPEED_MODES:
        r = m[f"speed/{name}"]
        L.append(f"| {name} | " + " | ".join(f"{100 * r[k]['exact_match']:.1f}%, {100 * r[k]['edit_similarity']:.1f}%, "
                                           f"{r[k]['tokens_per_pass']:.2f}/pass, "
                                           f"{1000 * r[k]['seconds_per_token']:.1f} ms" for k in KINDS) + " |")
    L.append("")
    for bench, label in (("humaneval", "HumanEval"), ("mbpp", "MBPP (sanitized)")):
        r = m[bench]
        L.append(f"- {label} pass@1 (greedy, chat prompt, 256 new tokens, sandboxed): {100 * r['pass@1']:.1f}% "
                 f"({r['n_passed_samples']}/{r['n_problems']}).")
    L += [f"- `diffcoder generate \"def fibonacci(n):\"` (defaults above, CLI start-up included): "
          f"{m['cli_seconds']:.1f} s wall on the machine above. It wrote:", "",
          "```", m["cli_output"].rstrip("\n")[:600], "```", "",
          "## What it cannot do",
          "- Solve programming problems: its benchmark scores are at or near zero. At a few million",
          "  parameters and a few million tokens it has learned the surface of Python (indentation,",
          "  keywords, common idioms, names from the context), not how to program.",
          "- Follow instructions beyond the one SFT format (signature + docstring -> function).",
          "- Other languages: the corpus is Python only.",
          "- Long contexts: it was trained on 512-token windows.",
          "- Anything safety-related: no safety tuning; treat its code as untrusted (`diffcoder eval` runs",
          "  it in a sandbox for that reason).", ""]
    atomic_write_text(out / "MODEL_CARD.md", "\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="OUT of runs/default_model.sh")
    ap.add_argument("--out", type=Path, required=True, help="export directory")
    ap.add_argument("--tasks", type=int, default=300, help="held-out tasks per kind")
    ap.add_argument("--card-only", action="store_true", help="keep the exported weights")
    ap.add_argument("--remeasure-speed", action="store_true", help="keep the weights and the quality numbers; "
                    "rerun only the timings (for a quiet machine) and rewrite the card")
    ap.add_argument("--card-from-cache", action="store_true", help="rewrite the card from the last measurements")
    ap.add_argument("--bench-limit", type=int, help="first N problems of HumanEval / MBPP only (smoke runs)")
    args = ap.parse_args()
    import torch

    import diffcoder

    if not (args.card_only or args.remeasure_speed or args.card_from_cache):
        model = diffcoder.load(args.run / "sft" / "final", dtype=torch.float32)
        diffcoder.save(model.to(torch.bfloat16), args.out, tokenizer=model.tokenizer,
                       generation_config=GENERATION)
    cache = args.run / "shipped-measurements.json"
    if args.card_from_cache:
        m = json.loads(cache.read_text())
    elif args.remeasure_speed:
        m = json.loads(cache.read_text()) | measure_speed(args.out, args.run, args.tasks)
    else:
        m = measure(args.out, args.run, args.tasks, args.bench_limit)
    cache.write_text(json.dumps(m, indent=1))
    write_card(args.out, args.run, m)
    print(json.dumps({"name": "export_default", "out": str(args.out), "cli_seconds": round(m["cli_seconds"], 2),
                      "humaneval_pass@1": m["humaneval"]["pass@1"], "mbpp_pass@1": m["mbpp"]["pass@1"]}))


if __name__ == "__main__":
    main()
