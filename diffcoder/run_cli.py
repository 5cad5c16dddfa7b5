"""`diffcoder generate` and `diffcoder chat`: decoding from the terminal, streamed block by block."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR|NAME", help="Hugging Face-layout checkpoint directory, or a model "
                   "name of `diffcoder pull` (pulled on first use; default: the small model shipped with diffcoder)")
    p.add_argument("--fallback-tiny", action="store_true", help="if --model NAME cannot be downloaded, say so "
                   "and use the small shipped model instead of stopping")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on GPUs and on CPUs with bf16 instructions, else float32)")


def add_runner_flag(p: argparse.ArgumentParser) -> None:
    from .config import RUNNERS

    p.add_argument("--runner", default="auto", choices=RUNNERS, help="how each pass runs: auto (CUDA graph on a "
                   "GPU, eager on a CPU), or compiled_static (torch.compile; compiles once per batch size and "
                   "length bucket: worth it for long chats, not for one prompt)")


def add_decoder_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoder (defaults: the checkpoint's generation_config.json, else these)")
    g.add_argument("--gen-length", type=int, help="tokens to generate; a multiple of --block-length (default 128)")
    g.add_argument("--steps", type=int, help="denoising steps in all; a multiple of gen_length/block_length "
                   "(default: gen_length, i.e. one token per forward pass as in the release README)")
    g.add_argument("--block-length", type=int, help="block size B (default 4, as Stable-DiffCoder was trained)")
    g.add_argument("--threshold", type=float, help="confidence threshold in (0, 1]: commit the top-1 plus every "
                   "masked position at least this confident (parallel decoding; default off)")
    g.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples (Gumbel-max)")
    g.add_argument("--remasking", choices=["low_confidence", "random"], help="which positions to commit first "
                   "(default low_confidence)")
    g.add_argument("--shift", action="store_true", default=None, help="logits at i-1 predict token i: for "
                   "autoregressive checkpoints (use with --block-length 1)")
    g.add_argument("--seed", type=int, help="random seed for temperature > 0 / random remasking")
    g.add_argument("--max-active-blocks", type=int, help="multi-block pipelining (approximate, needs --threshold): "
                   "up to this many blocks are denoised at once (default 1 = off)")
    g.add_argument("--block-add-threshold", type=float, help="pipelining: start the next block once this share "
                   "of the newest block is committed (default 0.5)")


DEFAULTS = dict(gen_length=128, steps=None, block_length=4, threshold=None, temperature=0.0,
                remasking="low_confidence", shift=False, seed=None, max_active_blocks=1, block_add_threshold=0.5)


def decoder_kwargs(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """Flags > the checkpoint's generation_config.json > DEFAULTS."""
    saved = getattr(model, "generation_defaults", {}) or {}
    kw = {}
    for key, default in DEFAULTS.items():
        flag = getattr(args, key, None)
        kw[key] = flag if flag is not None else saved.get(key, default)
    if kw["steps"] is None:
        kw["steps"] = kw["gen_length"]
    return kw


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_auto(path: Any, device: str = "auto", dtype: str = "auto") -> Any:
    """`diffcoder.load` with the CLI's choices: CUDA when present; bfloat16 on GPUs and on CPUs
    with native bf16, else float32."""
    from . import load
    from .fsutil import cpu_has_bf16

    device = pick_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") or cpu_has_bf16() else "float32"
    return load(path, device=device, dtype=dtype)


def load_model(args: argparse.Namespace) -> Any:
    from .defaults import default_model_dir

    from .pull import PullError

    try:
        model = load_auto(args.model or default_model_dir(), args.device, args.dtype)
    except PullError as exc:
        if not getattr(args, "fallback_tiny", False):
            raise
        print(f"note: {exc}\nnote: falling back to the small model embedded in diffcoder (diffcoder-tiny), "
              "which writes code-shaped text, not working programs", file=sys.stderr)
        model = load_auto(default_model_dir(), args.device, args.dtype)
    if model.tokenizer is None:
        raise ValueError(f"{args.model}: the checkpoint has no tokenizer.json; diffcoder generate needs text I/O")
    return model


class TextStream:
    """Prints decoded text as blocks arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any, out: Any = None) -> None:
        self.tok, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], 0

    def add(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        stable = text.rstrip("\ufffd")
        if len(stable) > self.shown:
            self.out.write(stable[self.shown:])
            self.out.flush()
            self.shown = len(stable)

    def text(self) -> str:
        return self.tok.decode(self.ids)


def stream_decode(model: Any, prompt_ids: list[int], kw: dict[str, Any], show_steps: bool,
                  out: Any = None, echo: str = "") -> tuple[str, Any]:
    import time

    from .decode import BlockEvent, Decoding, StepEvent

    tok = model.tokenizer
    out = out or sys.stdout  # looked up per call: sys.stdout may be replaced after import
    stream = TextStream(tok, out)
    eos = tok.eos_id
    dec = Decoding(model, [prompt_ids], eos_id=eos, step_events=show_steps, **kw)  # validates first
    out.write(echo)
    steps: list[StepEvent] = []
    t0 = time.perf_counter()
    for ev in dec:
        if isinstance(ev, BlockEvent):
            stream.add([t for t in ev.tokens if t != eos])
        elif isinstance(ev, StepEvent):
            steps.append(ev)
    dt = time.perf_counter() - t0
    out.write("\n")
    res = dec.result
    n = len(res.tokens[0])
    print(f"[{n} tokens, {res.nfe} forward passes ({res.nfe / max(n, 1):.2f}/token), {n / dt:.1f} tok/s, "
          f"finish: {res.finish_reasons[0]}]", file=sys.stderr)
    if show_steps:
        print_steps(tok, steps)
    return stream.text(), res


def print_steps(tok: Any, steps: list) -> None:
    """The denoising order: per block, which positions each step committed, with confidence."""
    print("denoising order (block: step -> position 'token' confidence):", file=sys.stderr)
    for ev in steps:
        parts = [f"{p}:{tok.decode([t], skip_special_tokens=False)!r}@{c:.2f}"
                 for p, t, c in zip(ev.positions, ev.tokens, ev.confidences)]
        print(f"  block {ev.block_index:3d}  step {ev.step}: " + "  ".join(parts), file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty: give text, or '-' to read it from stdin")
    model = load_model(args)
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}]) if args.chat else tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    kw = {**decoder_kwargs(args, model), "runner": args.runner}
    stream_decode(model, ids, kw, args.show_steps, echo="" if args.chat else prompt)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = load_model(args)
    tok = model.tokenizer
    kw = {**decoder_kwargs(args, model), "runner": args.runner}
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("diffcoder chat: /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(history)
        if interactive:
            sys.stdout.write("assistant> ")
        answer, _ = stream_decode(model, ids, kw, args.show_steps)
        history.append({"role": "assistant", "content": answer})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="complete a prompt (or answer it with --chat), streaming block by block",
                       description="Decode with block diffusion and print the text as blocks are committed.")
    g.add_argument("prompt", help="prompt text, or - to read it from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    g.add_argument("--show-steps", action="store_true", help="print the denoising order (which position each "
                   "step committed, with its confidence) to stderr")
    add_model_flags(g)
    add_decoder_flags(g)
    add_runner_flag(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive terminal chat with history (reads lines from stdin when piped)",
                       description="Chat with a model; each answer streams as blocks are committed.")
    c.add_argument("--system", help="a system message to start the conversation with")
    c.add_argument("--show-steps", action="store_true", help="print the denoising order of each answer to stderr")
    add_model_flags(c)
    add_decoder_flags(c)
    add_runner_flag(c)
    c.set_defaults(func=cmd_chat)
