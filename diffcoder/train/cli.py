"""`diffcoder tokenizer train`, `data build`, `data sft`, `train`, `plot`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import TrainConfig

S = argparse.SUPPRESS  # train flags default to "not given", so a --config TOML value is not overridden

TRAIN_HELP = {
    "objective": "ar (next token), block_diffusion (CPT) or sft (block diffusion on chat data)",
    "data": "data directory from `diffcoder data build` (ar, block_diffusion) or `data sft` (sft)",
    "out": "run directory: metrics.jsonl, checkpoints/, final/",
    "init": "start from this Hugging Face-layout checkpoint (e.g. the previous stage's RUNDIR/final)",
    "model_config": "new model: a preset (tiny, smol-135m, sdc-8b) or a JSON file of Llama config fields",
    "tokenizer": "tokenizer directory (required with --model-config; vocab size and special ids come from it)",
    "steps": "optimizer steps in all",
    "batch_size": "global batch in sequences (all processes and accumulation micro-steps together)",
    "seq_len": "tokens per sequence; a multiple of --block-size",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the decay",
    "lr_schedule": "cosine, wsd (warmup-stable-decay) or constant, after the linear --lr-warmup",
    "lr_warmup": "linear learning-rate warmup steps (default 5%% of --steps)",
    "wsd_decay_frac": "wsd: fraction of the steps spent decaying at the end",
    "grad_clip": "clip the global gradient norm to this (0 = no clipping)",
    "grad_accum": "micro-steps accumulated per optimizer step",
    "weight_decay": "AdamW weight decay (not applied to norms and biases)",
    "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2", "adam_eps": "AdamW epsilon",
    "seed": "seed for initialisation, data order and noise",
    "save_every": "write a resumable checkpoint every N steps (0 = only the final model)",
    "keep_last": "keep this many most recent checkpoints",
    "eval_every": "validation loss every N steps and at the end (0 = never)",
    "eval_batches": "validation micro-batches per evaluation",
    "resume": "continue from the latest checkpoint in --out",
    "block_size": "block size B of block diffusion",
    "shift": "keep the AR logit shift (logits at i-1 predict token i); default: no shift, as Stable-DiffCoder",
    "warmup_steps": "corruption warmup steps: u_max rises from --u-init to 1, loss weight 1 meanwhile "
                    "(default: 10%% of --steps for block_diffusion, 0 for sft)",
    "u_init": "u_max at step 0 of the corruption warmup",
    "no_warmup": "ablation: no corruption warmup (full U(0,1) noise and 1/u weights from step 0)",
    "no_clip": "ablation: do not clip the block mask rate to >= 1/B",
    "no_force_mask": "ablation: do not force-mask one position in blocks that drew no mask",
    "no_loss_weight": "ablation: loss weight 1 instead of 1/u_blk after warmup",
    "fim_rate": "share of pretraining rows rewritten to fill-in-the-middle order (<fim-suffix>S<fim-prefix>P"
                "<fim-middle>M<eos>, cut at token positions); ar and block_diffusion",
    "lora_rank": "train low-rank adapters of this rank on every linear layer (plus the mask token's embedding) "
                 "instead of all weights; 0 = full fine-tuning",
    "lora_alpha": "LoRA scale numerator: updates are scaled by alpha / rank (default 2 x rank)",
    "lora_dropout": "dropout on the adapters' input",
    "adapter": "start the adapters from this adapter directory (e.g. a previous run's RUNDIR/adapter)",
    "sft_min_eos": "sft: fewest EOS appended after each sample",
    "sft_max_eos": "sft: most EOS appended after each sample",
    "device": "cpu, cuda, cuda:N or auto (cuda when available; under torchrun each process takes its local GPU)",
    "precision": "auto (bf16 autocast where the hardware runs it natively), bf16 or fp32",
    "dist": "data parallelism under torchrun: ddp (replicated) or fsdp (FSDP2 fully_shard: parameters, "
            "gradients and optimizer state sharded)",
    "activation_checkpointing": "recompute layer activations in backward (less memory, more compute)",
    "trim_heap_every": "every N steps, return the memory the steps freed to the OS (glibc malloc_trim), so the "
                       "process does not grow over a run; 1 = after every step (the least memory, a few %% slower), "
                       "0 = never",
    "save_dtype": "dtype of final/ (float32, bfloat16); checkpoints keep float32 for exact resume",
    "quiet": "no progress bar, nor (without a terminal) the line every 10 steps",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_tokenizer(subparsers)
    _register_data(subparsers)
    _register_train(subparsers)
    _register_plot(subparsers)


def _register_tokenizer(subparsers: argparse._SubParsersAction) -> None:
    tok_sub = _command_group(subparsers, "tokenizer", "train a byte-level BPE tokenizer for code")
    tt = tok_sub.add_parser("train", help="train BPE on source files (specials, FIM tokens, chat template)")
    _src_flag(tt)
    tt.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including the specials")
    tt.add_argument("--out", type=Path, required=True, help="output tokenizer directory")
    tt.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen at least this often")
    _walk_flags(tt)
    tt.set_defaults(func=cmd_tokenizer_train)


def _register_data(subparsers: argparse._SubParsersAction) -> None:
    data_sub = _command_group(subparsers, "data", "build tokenized training data")
    db = data_sub.add_parser("build", help="source trees -> memory-mapped token shards + manifest.json")
    _src_flag(db)
    db.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory")
    db.add_argument("--out", required=True, type=Path, help="output data directory")
    db.add_argument("--val-fraction", type=float, default=0.01, help="share of files held out for validation")
    db.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    _walk_flags(db)
    db.set_defaults(func=cmd_data_build)
    ds = data_sub.add_parser("sft", help="SFT JSONL (chats {\"messages\": [...]}, FIM samples {\"fim\": {...}}) "
                             "-> samples with loss masks on the replies / middles")
    ds.add_argument("--src", nargs="+", required=True, type=Path, help="SFT JSONL file(s), gzipped or not")
    ds.add_argument("--tokenizer", required=True, type=Path,
                    help="tokenizer directory (a chat template for chats, FIM tokens for FIM samples)")
    ds.add_argument("--out", required=True, type=Path, help="output data directory")
    ds.add_argument("--val-fraction", type=float, default=0.02, help="share of samples held out")
    ds.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ds.add_argument("--quiet", action="store_true", help="no progress bar")
    ds.set_defaults(func=cmd_data_sft)
    sy = data_sub.add_parser("sft-synth", help="chat JSONL 'signature + docstring -> function' from the train "
                             "split of a `data build` directory (an offline SFT set)")
    sy.add_argument("--data", required=True, type=Path, help="pretraining data directory (uses its files.jsonl)")
    sy.add_argument("--out", required=True, type=Path, help="output chat JSONL file")
    sy.add_argument("--max-samples", type=int, default=2000, help="stop after this many conversations")
    sy.add_argument("--max-chars", type=int, default=1500, help="skip functions longer than this")
    sy.set_defaults(func=cmd_data_sft_synth)


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    tr = subparsers.add_parser("train", help="train: ar, block_diffusion (CPT) or sft; resumable; torchrun-ready")
    tr.add_argument("--config", type=Path, default=S, help="TOML file with the same keys as these flags "
                    "(flags given on the command line win)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            # --x/--no-x, so a flag can turn off what a --config TOML turns on; the ablation
            # switches are already negative (--no-clip) and stay one-way
            action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
            tr.add_argument(flag, action=action, default=S, help=TRAIN_HELP[f.name])
            continue
        kind = {int: int, float: float}.get(type(default), str)
        if f.name in ("lr_warmup", "warmup_steps"):
            kind = int
        extra = f" (default {default})" if default is not None and not isinstance(default, bool) else ""
        tr.add_argument(flag, type=kind, default=S, metavar=f.name.upper(), help=TRAIN_HELP[f.name] + extra)
    tr.set_defaults(func=cmd_train)


def _register_plot(subparsers: argparse._SubParsersAction) -> None:
    pl = subparsers.add_parser("plot", help="loss, grad norm, u_max and mask rate of runs, overlaid")
    pl.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    pl.add_argument("--out", required=True, type=Path, help="image file (.png, .pdf, .svg)")
    pl.add_argument("--labels", nargs="*", help="legend label per run (default: directory names)")
    pl.set_defaults(func=cmd_plot)


def _command_group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """`diffcoder NAME ACTION`: the group's actions go into the returned subparsers; the group
    called without its action prints its help (exit 2)."""
    group = subparsers.add_parser(name, help=help)
    group.set_defaults(func=_usage(group))
    return group.add_subparsers(dest=f"{name}_command", metavar="ACTION")


def _usage(parser: argparse.ArgumentParser):  # noqa: ANN202
    def show(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2
    return show


def _src_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", nargs="*", type=Path, help="files/directories of code (default: the Python stdlib)")


def _walk_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ext", nargs="*", help="file extensions to keep (default: common code/text extensions)")
    p.add_argument("--max-file-bytes", type=int, default=1_000_000, help="skip files larger than this")
    p.add_argument("--max-files", type=int, help="stop after this many kept files (quick experiments)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _exts(args: argparse.Namespace) -> tuple[str, ...]:
    from .corpus import CODE_EXTENSIONS

    if not args.ext:
        return CODE_EXTENSIONS
    return tuple(e if e.startswith(".") else "." + e for e in (x.lower() for x in args.ext))


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizer_train import train_tokenizer

    info = train_tokenizer(args.src, args.vocab_size, args.out, min_frequency=args.min_frequency,
                           max_files=args.max_files, max_file_bytes=args.max_file_bytes, extensions=_exts(args),
                           overwrite=args.overwrite)
    print(json.dumps(info))
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from .shards import build_pretrain

    m = build_pretrain(args.src, args.tokenizer, args.out, val_fraction=args.val_fraction, extensions=_exts(args),
                       max_file_bytes=args.max_file_bytes, max_files=args.max_files, shard_tokens=args.shard_tokens,
                       overwrite=args.overwrite, progress=not args.quiet)
    summary = {s: {k: v for k, v in m["splits"][s].items() if k != "shards"} for s in m["splits"]}
    print(json.dumps({"out": str(args.out), "splits": summary, "skipped": m["skipped"]}))
    return 0


def cmd_data_sft(args: argparse.Namespace) -> int:
    from .sft_data import build_sft

    m = build_sft(args.src, args.tokenizer, args.out, val_fraction=args.val_fraction, overwrite=args.overwrite,
                  progress=not args.quiet)
    print(json.dumps({"out": str(args.out), "splits": {s: {k: v[k] for k in ("samples", "fim_samples", "tokens")}
                                                       for s, v in m["splits"].items()}}))
    return 0


def cmd_data_sft_synth(args: argparse.Namespace) -> int:
    from .sft_synth import synthesize

    n = synthesize(args.data, args.out, args.max_samples, args.max_chars)
    print(json.dumps({"out": str(args.out), "conversations": n}))
    return 0


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The --config TOML's values, overridden by the flags given on the command line."""
    from .config import load_toml, make_config

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    toml_values = load_toml(args.config) if getattr(args, "config", None) else {}
    return make_config(toml_values, flags)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from .trainer import train

    final = train(cfg)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final": str(final)}))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_runs

    out = plot_runs(args.runs, args.out, args.labels)
    print(json.dumps({"out": str(out)}))
    return 0
