"""`diffcoder convert gguf FILE.gguf --out DIR`: import a llama.cpp GGUF checkpoint."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    convert = subparsers.add_parser(
        "convert", help="import checkpoints from other formats into the Hugging Face layout"
    )
    kinds = convert.add_subparsers(dest="convert_kind", metavar="FORMAT")
    convert.set_defaults(func=lambda args: _missing_format(convert))
    p = kinds.add_parser(
        "gguf",
        help="GGUF (llama.cpp) Llama-family model -> Hugging Face checkpoint + tokenizer",
        description=(
            "Dequantise a Llama-family GGUF file (architecture llama or qwen2; F32/F16/BF16, Q4_0..Q8_0, K-quants, IQ-quants) into a "
            "Hugging Face-layout folder that diffcoder.load and transformers both read. An autoregressive "
            "model has no mask token: one is added (see --mask-token), and block_length 1 + shift are stored "
            "as its decoding defaults, so `diffcoder chat --model DIR` runs it as the AR model it is."
        ),
    )
    p.add_argument("file", metavar="FILE.gguf", help="the GGUF file to convert")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must be empty unless --force)")
    p.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16",
        help="dtype of the written weights (default bfloat16; float32 keeps the dequantised values exactly)",
    )
    p.add_argument(
        "--mask-token", default=None, metavar="TOKEN",
        help="token used as the diffusion mask: reused if the vocabulary has it (the model is then taken "
             "for a diffusion model), else appended as a new special token with its own embedding row "
             "(default <[MASK_TOKEN]>)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it already exists and is not empty")
    p.add_argument(
        "--max-shard-mib", type=int, default=4096, metavar="MIB",
        help="largest safetensors shard in MiB (default 4096); bigger checkpoints are split with an index",
    )
    p.add_argument("--quiet", action="store_true", help="print only the final summary line")
    p.set_defaults(func=run_gguf)


def _convert_with_bar(file: str, out: str, kwargs: dict[str, Any]) -> Any:
    """convert_gguf with a rich progress bar (on stderr) over the tensors."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from diffcoder.convert.gguf_import import convert_gguf

    columns = (TextColumn("dequantising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        return convert_gguf(file, out, progress=update, **kwargs)


def _missing_format(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_gguf(args: argparse.Namespace) -> int:
    from diffcoder.convert.gguf_import import convert_gguf

    if args.max_shard_mib <= 0:
        raise ValueError(f"--max-shard-mib must be positive, got {args.max_shard_mib}")
    kwargs = dict(dtype=args.dtype, mask_token=args.mask_token, overwrite=args.force,
                  max_shard_bytes=args.max_shard_mib << 20)
    if args.quiet:
        report = convert_gguf(args.file, args.out, **kwargs)
    else:
        report = _convert_with_bar(args.file, args.out, kwargs)
    hp = report.hparams
    how = "appended as" if report.mask_added else "= existing"
    mask = f"mask {report.mask_token!r} {how} id {report.mask_id}"
    print(
        f"wrote {report.out_dir}: {hp.arch}, {hp.n_layers} layers, hidden {hp.hidden}, heads {hp.n_heads}/{hp.n_kv_heads}, "
        f"vocab {report.vocab_size}, {'tied' if hp.tied else 'untied'} embeddings, {report.dtype}, {mask}, "
        f"{report.n_bytes / 2**20:.0f} MiB in {report.n_files} file(s)"
    )
    return 0

