"""`diffcoder generate` and `diffcoder chat`: decoding from the terminal, streamed block by block."""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..config import REMASKING


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR|NAME", help="Hugging Face-layout checkpoint directory, or a model "
                   "name of `diffcoder pull` (pulled on first use; default: the small model shipped with diffcoder)")
    p.add_argument("--fallback-tiny", action="store_true", help="if --model NAME cannot be downloaded, say so "
                   "and use the small shipped model instead of stopping")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on GPUs, on CPUs with bf16 instructions and on CPUs "
                        "with AVX-512 (the AVX-512 matmul kernel), else float32)")


def add_runner_flag(p: argparse.ArgumentParser) -> None:
    from ..config import RUNNERS

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
    g.add_argument("--remasking", choices=REMASKING, help="which positions to commit first: the most confident "
                   "(low_confidence), random ones, or the leftmost (left_to_right; with --threshold, the leftmost plus "
                   "the run after it at least that confident); default: the model's, else low_confidence")
    g.add_argument("--shift", action="store_true", default=None, help="logits at i-1 predict token i: for "
                   "autoregressive checkpoints (use with --block-length 1)")
    g.add_argument("--seed", type=int, help="random seed for temperature > 0 / random remasking")
    g.add_argument("--max-active-blocks", type=int, help="multi-block pipelining (approximate, needs --threshold): "
                   "up to this many blocks are denoised at once (default 1 = off)")
    g.add_argument("--block-add-threshold", type=float, help="pipelining: start the next block once this share "
                   "of the newest block is committed (default 0.5)")
    g.add_argument("--speculative", action=argparse.BooleanOptionalAction, help="exact parallel decoding (greedy, one "
                   "token per pass): each pass also checks the last pass's guesses for the block's next positions "
                   "and commits those that one token per pass would commit; the same tokens in fewer passes (default: the "
                   "model's, where the other settings allow it)")


def decoder_kwargs(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """Flags > the checkpoint's generation_config.json > DEFAULTS (engine/settings.py)."""
    from .settings import DEFAULTS, resolve

    return resolve({key: getattr(args, key) for key in DEFAULTS if getattr(args, key, None) is not None}, model)


def load_auto(path: Any, device: str = "auto", dtype: str = "auto") -> Any:
    """`diffcoder.load` with the CLI's choices (diffcoder.hardware): CUDA when present; bfloat16
    where the device runs it natively or its matmuls run on the AVX-512 kernel, else float32."""
    from .. import load
    from ..hardware import pick_device
    from ..kernels.linear import decode_dtype

    device = pick_device(device)
    return load(path, device=device, dtype=decode_dtype(dtype, device))


def load_model(args: argparse.Namespace) -> Any:
    from ..defaults import default_model_dir

    from ..hub import PullError

    try:
        model = load_auto(args.model or default_model_dir(), args.device, args.dtype)
    except PullError as exc:
        if not getattr(args, "fallback_tiny", False):
            raise
        print(f"note: {exc}\nnote: falling back to the small model embedded in diffcoder (diffcoder-tiny), "
              "which writes code-shaped text, not working programs", file=sys.stderr)
        args.model = None  # what ran is the default model: results and settings must say so
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

    from .decoding import BlockEvent, Decoding, StepEvent

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


CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "start a new conversation (the --system message stays)",
    "/exit": "quit (also /quit, Ctrl-D, or Ctrl-C at the prompt)",
}
HISTORY_FILE = "chat_history"


def _readline_history() -> Any:
    """Line editing and history (Up/Down, kept in the cache dir) where Python has readline; a
    callable that saves the history, or None."""
    try:
        import readline
    except ImportError:
        return None
    from ..fsutil import cache_root

    path = cache_root() / HISTORY_FILE
    readline.set_auto_history(False)  # only real turns and commands go in, blank lines not
    readline.set_history_length(1000)
    try:
        readline.read_history_file(path)
    except OSError:
        pass

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as exc:
            print(f"note: could not save the chat history to {path}: {exc}", file=sys.stderr)

    return save


def chat_repl(model: Any, kw: dict[str, Any], system: str | None = None, show_steps: bool = False,
              interactive: bool | None = None) -> int:
    """Read turns with input() and stream each answer; commands (CHAT_COMMANDS) never reach the
    model. Ctrl-C during an answer stops it and drops that turn; Ctrl-C or Ctrl-D at the prompt quits."""
    tok = model.tokenizer
    start = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = list(start)
    interactive = sys.stdin.isatty() if interactive is None else interactive
    save_history = _readline_history() if interactive else None
    if interactive:
        print("diffcoder chat: /help lists the commands; Ctrl-C stops an answer, Ctrl-D quits.", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    print(file=sys.stderr)
                break
            if not line.strip():
                continue
            if save_history:
                import readline

                if readline.get_history_item(readline.get_current_history_length()) != line:
                    readline.add_history(line)
            command = line.strip()
            if re.fullmatch(r"/[A-Za-z]+", command):
                if command in ("/exit", "/quit"):
                    break
                if command == "/help":
                    for name, what in CHAT_COMMANDS.items():
                        print(f"  {name:<7} {what}", file=sys.stderr)
                    print("  Ctrl-C during an answer stops it; the conversation before it is kept", file=sys.stderr)
                elif command == "/reset":
                    history = list(start)
                    print("conversation cleared" + (" (the system message stays)" if start else ""),
                          file=sys.stderr)
                else:
                    print(f"unknown command {command}; /help lists them", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            ids = tok.apply_chat_template(history)
            if interactive:
                sys.stdout.write("assistant> ")
            try:
                answer, _ = stream_decode(model, ids, kw, show_steps)
            except KeyboardInterrupt:
                history.pop()
                sys.stdout.write("\n")
                print("[stopped; this turn is left out of the conversation]", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": answer})
    finally:
        if save_history:
            save_history()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ..defaults import default_model_dir

    print(f"loading {args.model or default_model_dir(announce=False).name}...", file=sys.stderr)
    model = load_model(args)
    kw = {**decoder_kwargs(args, model), "runner": args.runner}
    return chat_repl(model, kw, system=args.system, show_steps=args.show_steps)


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
                       description="Chat with a model; each answer streams as blocks are committed. "
                       "On a terminal: line editing and history (kept in the cache directory), /help lists "
                       "the commands, Ctrl-C stops an answer, Ctrl-D quits.")
    c.add_argument("--system", help="a system message to start the conversation with")
    c.add_argument("--show-steps", action="store_true", help="print the denoising order of each answer to stderr")
    add_model_flags(c)
    add_decoder_flags(c)
    add_runner_flag(c)
    c.set_defaults(func=cmd_chat)
