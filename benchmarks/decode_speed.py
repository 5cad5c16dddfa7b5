"""Decode speed: our engine against the release's approach, same weights, same prompts, one run.

    python benchmarks/decode_speed.py --shape tiny --gen-length 256 --steps 256
    python benchmarks/decode_speed.py --shape smol-135m --dtype bfloat16 --batch-sizes 1,16
    python benchmarks/decode_speed.py --shape sdc-8b --device cuda --dtype bfloat16

Prints a table and, as its last line, one JSON object. The memory-bandwidth limit is
measured here (a large read), and the fraction reached is weight bytes x passes/s over it. Each
batch size also gets the passes/s of its matmuls alone (the same kernels and weights, nothing
else): the ceiling that the rest of the pass is measured against.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

import diffcoder
from diffcoder.config import PRESETS, ModelConfig
from diffcoder.hardware import pick_device, pick_dtype
from diffcoder.engine.decoding import BlockEvent, Decoding
from diffcoder.kernels import (FOLDING, MATMUL_KERNELS, SWITCHES, confidence_ops, folds_query_groups,
                               using_policy)
from diffcoder.kernels.linear import decode_matmul_kernel
from diffcoder.model import DiffCoderLM
from diffcoder.engine.runners import RUNNERS, make_runner

# This folder's modules (on sys.path: a script's own folder, and pytest's pythonpath).
from decode_ceilings import (matmul_bound_tokens_per_s, matmul_only_passes_per_s, measure_bandwidth,
                             weight_bytes_per_pass, weight_read_passes_per_s)
from measure import hardware_name, peak_memory, sync
from release_baseline import baseline_generate


def random_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> DiffCoderLM:
    """Random weights straight on the device (an 8B model is not built on the CPU first)."""
    cfg = ModelConfig(**{"mask_token_id": 5, "max_position_embeddings": 8192, **PRESETS[shape]})
    with default_dtype(dtype), torch.device("meta"):
        model = DiffCoderLM(cfg)
    model.to_empty(device=device)  # allocated once, in the target dtype
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.mask_id = cfg.mask_token_id
    return model.eval()


def hf_twin(model: DiffCoderLM) -> Any:
    """transformers.LlamaForCausalLM with a copy of our weights, on the same device."""
    import transformers

    hcfg = transformers.LlamaConfig(**model.config.to_dict())
    with default_dtype(model.dtype), torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hcfg)
    hf.to_empty(device=model.device)
    hf.load_state_dict(model.state_dict(), strict=False)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    rot = hf.model.rotary_emb
    with torch.device(model.device):  # inv_freq was left uninitialised by to_empty
        hf.model.rotary_emb = type(rot)(config=hcfg)
    return hf.eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def profile_decode(model: DiffCoderLM, prompts: list[list[int]], kw: dict[str, Any], top: int) -> dict[str, Any]:
    """Where one decode's time goes, op by op (kernels too, on a GPU, including those a CUDA graph
    replays): self time on the device (GPU) or on the CPU, per pass, averaged over the decode's
    passes (the prefill is one of them), the `top` largest first."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        nfe = run_ours(model, prompts, kw)["nfe"]
    rows = [((e.self_device_time_total if on_gpu else e.self_cpu_time_total), e.key, e.count)
            for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[0] > 0), reverse=True)
    total_us = sum(r[0] for r in rows)
    return {"clock": "device" if on_gpu else "cpu", "passes": nfe, "total_ms_per_pass": total_us / 1e3 / nfe,
            "ops": [{"name": name, "ms_per_pass": us / 1e3 / nfe, "share": us / total_us, "calls_per_pass": n / nfe}
                    for us, name, n in rows[:top]]}


def print_profile(prof: dict[str, Any]) -> None:
    print(f"       profile: {prof['total_ms_per_pass']:.3f} ms of {prof['clock']} self time per pass "
          f"(mean of {prof['passes']} passes, the prefill included); largest:")
    for op in prof["ops"]:
        print(f"         {op['ms_per_pass']:8.3f} ms {100 * op['share']:5.1f}% {op['calls_per_pass']:7.1f} calls  "
              f"{op['name'][:100]}")


def native_ops_used(model: DiffCoderLM, confidence_dtype: torch.dtype, block_length: int) -> list[str]:
    """Which of the native CPU ops besides the matmuls (diffcoder/kernels) a decode of this model
    runs, asked of the same routing the model and the decoder use (under the kernel policy the
    benchmark set)."""
    used = []
    with torch.inference_mode():
        step = torch.empty(1, block_length, model.config.hidden_size, dtype=model.dtype, device=model.device)
        if model.plan_pass(step, block_length, None).native is not None:
            used.append("attention")
        if confidence_dtype == torch.float64 and confidence_ops(step[0]) is not None:
            used.append("confidence")
    return used


def run_ours(model: DiffCoderLM, prompts: list[list[int]], kw: dict[str, Any]) -> dict[str, Any]:
    device = model.device
    sync(device)
    t0 = time.perf_counter()
    first = None
    dec = Decoding(model, prompts, **kw)
    for ev in dec:
        if first is None and isinstance(ev, BlockEvent):
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    dt = time.perf_counter() - t0
    res = dec.result
    ntok = sum(len(t) for t in res.tokens)
    return {"seconds": dt, "tokens": ntok, "nfe": res.nfe, "tokens_per_s": ntok / dt, "passes_per_s": res.nfe / dt,
            "passes_per_token": res.nfe / max(ntok, 1), "time_to_first_block_s": first, "out": res.tokens}


def run_baseline(hf: Any, prompt: list[int], kw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    ids = torch.tensor([prompt], device=device)
    sync(device)
    t0 = time.perf_counter()
    out, nfe = baseline_generate(hf, ids, steps=kw["steps"], gen_length=kw["gen_length"],
                                block_length=kw["block_length"], mask_id=kw["mask_id"], threshold=kw["threshold"])
    sync(device)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": len(out), "nfe": nfe, "tokens_per_s": len(out) / dt, "passes_per_s": nfe / dt,
            "passes_per_token": nfe / max(len(out), 1), "out": out.tolist()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (instead of --shape)")
    p.add_argument("--shape", default="tiny", choices=sorted(PRESETS), help="random-weight model shape")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes for our engine (baseline: 1)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=4)
    p.add_argument("--steps", type=int, help="default: gen_length (one token per pass)")
    p.add_argument("--threshold", type=float)
    p.add_argument("--remasking", choices=["low_confidence", "left_to_right"], default="low_confidence",
                   help="in-block order (low_confidence: the release's; left_to_right: our engine only)")
    p.add_argument("--shift", action="store_true", help="logit shift (AR-initialised models; with --block-length 1 "
                   "this is AR decoding); our engine only")
    p.add_argument("--runner", default="auto", choices=list(RUNNERS))
    p.add_argument("--confidence-dtype", default="float64", choices=["float64", "float32"],
                   help="float64 = release parity; float32 = faster, may reorder near-ties")
    p.add_argument("--no-baseline", action="store_true", help="skip the release-approach baseline")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is reported)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="after timing, profile one decode per batch size and print its TOP largest ops "
                        "(self time per pass; on a GPU the kernels, CUDA-graph replays included; a compiled "
                        "CPU step is compiled with a record per fused kernel, which costs its timed runs a "
                        "little)")
    p.add_argument("--fold-query-groups", default="auto", choices=list(FOLDING),
                   help="GQA attention with each KV head's query heads folded into one query (auto: the "
                        "device's default in diffcoder.kernels.policy.FOLDS_BY_DEFAULT)")
    p.add_argument("--cpu-matmul", default="auto", choices=list(MATMUL_KERNELS),
                   help="bf16 matmul kernel on a CPU: our AMX kernel for decode-sized calls (auto: where it "
                        "works) or oneDNN for all; see diffcoder/kernels")
    p.add_argument("--cpu-attention", default="auto", choices=list(SWITCHES),
                   help="decode-step attention on a CPU in bf16: our native op (auto: where it works) or SDPA")
    p.add_argument("--cpu-confidence", default="auto", choices=list(SWITCHES),
                   help="greedy float64 confidences on a CPU: our native op (auto: where it works) or torch's ops")
    p.add_argument("--ab-torch-ops", action="store_true",
                   help="pair every timed run with one on SDPA and torch's confidence ops, in the same process")
    return p.parse_args(argv)


def command_line(argv: list[str] | None) -> str:
    """The benchmark's command, with any torch/inductor settings it ran under taken from the
    environment (TORCHINDUCTOR_*, TORCH_*; not the cache and install locations, which inductor
    itself sets), so that a results row can be rerun as printed."""
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if k.startswith(("TORCHINDUCTOR_", "TORCH_")) and not k.endswith(("_DIR", "_HOME", "_PATH"))]
    return " ".join([*env, "python benchmarks/decode_speed.py", *(sys.argv[1:] if argv is None else argv)])


# --- the kernel policy a run sets, for the run only (using_policy and the config patch restore it)

def policy_variants(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Result key suffix -> the kernel policy of its runs: the flags', and with --ab-torch-ops the
    same matmuls on SDPA and torch's confidence ops (the compiled step is traced once per policy;
    dynamo keeps both)."""
    flags = dict(matmul=args.cpu_matmul, attention=args.cpu_attention, confidence=args.cpu_confidence,
                 fold_query_groups=args.fold_query_groups)
    variants = {"": flags}
    if args.ab_torch_ops:
        variants["_torch_ops"] = {**flags, "attention": "torch", "confidence": "torch"}
    return variants


def inductor_kernel_records(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    """A compiled CPU step is otherwise one opaque entry in a profile: with --profile, inductor gives
    each of its fused C++ kernels a profiler record (set before anything compiles)."""
    if not (args.profile > 0 and args.runner.startswith("compiled") and device.type == "cpu"):
        return contextlib.nullcontext()
    from torch._inductor import config as inductor_config

    return inductor_config.patch({"cpp.enable_kernel_profile": True})


# --- what every timed run shares

@dataclass
class Setup:
    """One benchmark's model, prompts and decode settings, and the machine's limits."""
    device: torch.device
    model: DiffCoderLM
    label: str  # the model as the results name it
    prompts: list[list[int]]  # one per row of the largest batch
    settings: dict[str, Any]  # decode settings as the baseline takes them (ours: all but mask_id)
    batch_sizes: list[int]
    weight_bytes: int  # what every pass reads
    readers: dict[str, float]  # bytes/s of each way this script read a large buffer
    hardware: str
    matmul_kernel: str | None  # the decode steps' bf16 matmul kernel on a CPU
    native_ops: list[str]  # the native CPU ops besides the matmuls a decode runs

    @property
    def bandwidth(self) -> float:
        """The limit passes are measured against: the fastest reader's bytes/s."""
        return max(self.readers.values())

    @property
    def ours_kw(self) -> dict[str, Any]:
        return {k: v for k, v in self.settings.items() if k != "mask_id"}

    def bandwidth_fraction(self, passes_per_s: float) -> float:
        return self.weight_bytes * passes_per_s / self.bandwidth


def benchmark_model(args: argparse.Namespace, device: torch.device) -> tuple[DiffCoderLM, str]:
    """The checkpoint of --model, else random weights of --shape; and its label in the results."""
    dtype = pick_dtype(args.dtype, device)
    if args.model:  # a directory or a registered model name (pulled on first use)
        return diffcoder.load(args.model, device=device, dtype=dtype), args.model
    return random_model(args.shape, dtype, device, args.seed), f"random {args.shape}"


def random_prompts(model: DiffCoderLM, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` random ids below 5000, the mask token left out."""
    gen = torch.Generator().manual_seed(seed)
    vocab_ok = [t for t in range(min(model.config.vocab_size, 5000)) if t != model.mask_id]
    return [[vocab_ok[i] for i in torch.randint(len(vocab_ok), (length,), generator=gen).tolist()]
            for _ in range(count)]


def decode_settings(args: argparse.Namespace, mask_id: int) -> dict[str, Any]:
    kw = dict(steps=args.steps or args.gen_length, gen_length=args.gen_length, block_length=args.block_length,
              threshold=args.threshold, mask_id=mask_id, runner=args.runner,
              confidence_dtype=getattr(torch, args.confidence_dtype))
    if args.shift:
        if not args.no_baseline:
            raise SystemExit("--shift: the release-approach baseline has no correct shift decoding; add --no-baseline")
        kw["shift"] = True
    if args.remasking != "low_confidence":
        if not args.no_baseline:
            raise SystemExit(f"--remasking {args.remasking}: the release-approach baseline decodes by confidence only; "
                             "add --no-baseline")
        kw["remasking"] = args.remasking
    return kw


def prepare(args: argparse.Namespace, device: torch.device) -> Setup:
    """The model and its prompts, the read bandwidth (measured before the model is prepared for
    decoding), and which kernels its decode steps run."""
    model, label = benchmark_model(args, device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = random_prompts(model, max(batch_sizes), args.prompt_len, args.seed)
    settings = decode_settings(args, model.mask_id)
    weight_bytes = weight_bytes_per_pass(model)
    readers = measure_bandwidth(device, 1 << 30 if device.type == "cpu" else 4 << 30)
    hardware = hardware_name(device)
    model.prepare_for_decoding()  # what every decode does first (idempotent); packs bf16 weights on a CPU
    native = native_ops_used(model, settings["confidence_dtype"], settings["block_length"])
    return Setup(device, model, label, prompts, settings, batch_sizes, weight_bytes, readers, hardware,
                 decode_matmul_kernel(model.linear), native)


def print_setup(setup: Setup, args: argparse.Namespace, fold: bool) -> None:
    print(f"hardware: {setup.hardware}; measured read bandwidth {setup.bandwidth / 1e9:.1f} GB/s (fastest of: "
          + ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in setup.readers.items()) + ")"
          + (f"; decode matmuls on {setup.matmul_kernel}" if setup.matmul_kernel else "")
          + (f"; native {' and '.join(setup.native_ops)}" if setup.native_ops else ""))
    print(f"model: {setup.label}, {setup.model.config.num_parameters / 1e6:.1f}M params, {args.dtype}, "
          f"{setup.weight_bytes / 1e6:.1f} MB read per pass -> limit {setup.bandwidth / setup.weight_bytes:.1f} "
          f"passes/s; runner {args.runner}, query-group folding {fold}")


# --- the runs

def warm_up(setup: Setup, variants: dict[str, dict[str, str]]) -> None:
    """One untimed run per batch size and policy with the timed settings, so that compiled runners
    compile here (their graphs are specialised to the batch size and the cache length)."""
    for b in setup.batch_sizes:
        for policy in variants.values():
            with using_policy(**policy):
                run_ours(setup.model, setup.prompts[:b], setup.ours_kw)


def weight_read_ceiling(setup: Setup) -> float:
    """Passes/s of reading each matmul weight once, timed after the warm-up: the weights as decoding uses them."""
    read_rate = weight_read_passes_per_s(setup.model)
    print(f"reading each matmul weight once, one op per weight: {read_rate:8.1f} passes/s  "
          f"{100 * setup.bandwidth_fraction(read_rate):.0f}% of bandwidth limit")
    return read_rate


def baseline_model(setup: Setup) -> Any:
    """Our weights on transformers for the release-approach baseline, warmed up by one short decode."""
    hf = hf_twin(setup.model)
    short = {**setup.settings, "gen_length": setup.settings["block_length"] * 2, "steps": 2}
    run_baseline(hf, setup.prompts[0], short, setup.device)
    return hf


@dataclass
class Rounds:
    """Every timed run of one benchmark."""
    ours: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # result key -> our runs
    baseline: list[dict[str, Any]] = field(default_factory=list)  # batch 1
    matmul_rates: dict[tuple[int, int], float] = field(default_factory=dict)  # (rows, head rows) -> best passes/s


def timed_rounds(setup: Setup, variants: dict[str, dict[str, str]], hf: Any, repeats: int) -> Rounds:
    """`repeats` rounds, each going round every batch size (and policy) in turn, batch 1 alternating
    with the baseline: on a shared machine whose speed drifts, each setting then samples the same
    moments. Each batch size's matmuls alone are timed in the same round as its decodes."""
    rounds = Rounds()
    for _ in range(repeats):
        for b in setup.batch_sizes:
            for suffix, policy in variants.items():
                with using_policy(**policy):
                    run = run_ours(setup.model, setup.prompts[:b], setup.ours_kw)
                rounds.ours.setdefault(f"batch{b}{suffix}", []).append(run)
            if hf is not None and b == 1:
                rounds.baseline.append(run_baseline(hf, setup.prompts[0], setup.settings, setup.device))
            sample_matmul_ceilings(setup.model, pass_rows(setup, b), rounds.matmul_rates)
    return rounds


@dataclass(frozen=True)
class PassRows:
    """The rows of a decode's passes at one batch size, as the engine runs them."""
    step: int  # a block step
    commit: int  # a block's first pass, which also writes the last block into the cache
    head: int  # rows a pass projects onto the vocabulary

    def keys(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (self.step, self.head), (self.commit, self.head)


def pass_rows(setup: Setup, b: int) -> PassRows:
    """Batch b's pass shapes. Leftmost first at one token per pass, the eager runner projects one
    column per sequence, and with shift a block's first pass leaves the noisy block out (its pick's
    logits come from the last clean column); AR mode (B = 1, shift) always does. Otherwise a
    commit pass is the clean block and the noisy one, and every window column is projected."""
    s = setup.settings
    block, rows, shift = s["block_length"], b * s["block_length"], bool(s.get("shift"))
    one_per_pass = s.get("threshold") is None and s["steps"] == s["gen_length"]
    narrow = (one_per_pass and s.get("remasking") == "left_to_right"
              and make_runner(setup.model, block, s["runner"]).narrows_logits)
    if block == 1 and shift:
        return PassRows(rows, rows, rows)
    return PassRows(rows, rows if narrow and shift else 2 * rows, b if narrow else rows)


def sample_matmul_ceilings(model: DiffCoderLM, shapes: PassRows, best: dict[tuple[int, int], float]) -> None:
    """The matmuls alone of a block step and of a commit pass (rows, rows through the vocabulary
    projection), each kept in `best` at its fastest."""
    for key in shapes.keys():
        rate = matmul_only_passes_per_s(model, key[0], repeats=2, head_rows=key[1])
        best[key] = max(best.get(key, 0.0), rate)


# --- the results

def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: r["seconds"])


def batch_result(setup: Setup, rounds: Rounds, b: int) -> dict[str, Any]:
    """Batch b's fastest run with its ceilings: the matmuls alone of a block step and of a fused
    commit pass, and the tokens/s of a decode made of nothing else."""
    best = fastest(rounds.ours[f"batch{b}"])
    best["peak_memory_bytes"] = peak_memory(setup.device)
    best["bandwidth_fraction"] = setup.bandwidth_fraction(best["passes_per_s"])
    block = setup.settings["block_length"]
    shapes = pass_rows(setup, b)
    step_key, commit_key = shapes.keys()
    step_rate, commit_rate = rounds.matmul_rates[step_key], rounds.matmul_rates[commit_key]
    best["commit_rows"] = shapes.commit
    best["head_rows"] = shapes.head
    best["matmul_only_passes_per_s"] = step_rate
    best["matmul_only_bandwidth_fraction"] = setup.bandwidth_fraction(step_rate)
    best["commit_matmul_only_passes_per_s"] = commit_rate
    best["matmul_bound_tokens_per_s"] = matmul_bound_tokens_per_s(
        best, step_rate, commit_rate, setup.settings["gen_length"] // block)
    return best


def print_batch_result(best: dict[str, Any], b: int, rows: int) -> None:
    print(f"ours   batch {b:3d}: {best['tokens_per_s']:9.1f} tok/s  {best['passes_per_s']:8.1f} passes/s  "
          f"{best['passes_per_token']:.3f} passes/token  first block {best['time_to_first_block_s'] * 1e3:.1f} ms"
          f"  {100 * best['bandwidth_fraction']:.0f}% of bandwidth limit")
    print(f"       its matmuls alone ({rows} rows): {best['matmul_only_passes_per_s']:8.1f}"
          f" passes/s  {100 * best['matmul_only_bandwidth_fraction']:.0f}% of bandwidth limit; "
          f"{best['commit_rows']} rows (the commit pass): {best['commit_matmul_only_passes_per_s']:.1f} passes/s; "
          f"a decode of matmuls alone: {best['matmul_bound_tokens_per_s']:.1f} tok/s")


def our_results(setup: Setup, rounds: Rounds, profile_top: int) -> dict[str, dict[str, Any]]:
    """Each batch size's result, printed, and with --profile its op profile."""
    results = {}
    for b in setup.batch_sizes:
        best = results[f"batch{b}"] = batch_result(setup, rounds, b)
        print_batch_result(best, b, b * setup.settings["block_length"])
        if profile_top > 0:
            best["profile"] = profile_decode(setup.model, setup.prompts[:b], setup.ours_kw, profile_top)
            print_profile(best["profile"])
    return results


def torch_ops_results(setup: Setup, rounds: Rounds) -> dict[str, dict[str, Any]]:
    """The --ab-torch-ops side: each batch size's fastest run on SDPA and torch's confidence ops."""
    results = {}
    for b in setup.batch_sizes:
        best = results[f"batch{b}_torch_ops"] = fastest(rounds.ours[f"batch{b}_torch_ops"])
        best["bandwidth_fraction"] = setup.bandwidth_fraction(best["passes_per_s"])
        print(f"ours with SDPA and torch's confidence ops, batch {b:3d}: {best['tokens_per_s']:9.1f} tok/s  "
              f"{best['passes_per_s']:8.1f} passes/s")
    return results


def summary_of(args: argparse.Namespace, setup: Setup, fold: bool, read_rate: float,
               results: dict[str, dict[str, Any]], argv: list[str] | None) -> dict[str, Any]:
    return {
        "hardware": setup.hardware, "device": setup.device.type, "model": setup.label, "dtype": args.dtype,
        "params": setup.model.config.num_parameters, "weight_bytes_per_pass": setup.weight_bytes,
        "bandwidth_bytes_per_s": setup.bandwidth, "bandwidth_readers": setup.readers, "prompt_len": args.prompt_len,
        "gen_length": args.gen_length, "block_length": args.block_length, "steps": setup.settings["steps"],
        "shift": args.shift, "threshold": args.threshold, "remasking": args.remasking, "runner": args.runner,
        "confidence_dtype": args.confidence_dtype, "fold_query_groups": fold, "cpu_matmul": setup.matmul_kernel,
        "native_ops": setup.native_ops, "weight_read_passes_per_s": read_rate,
        "weight_read_bandwidth_fraction": setup.bandwidth_fraction(read_rate),
        "ours": {k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in results.items()},
        "command": command_line(argv),
    }


def batch_scaling(results: dict[str, dict[str, Any]], batch_sizes: list[int]) -> dict[str, float]:
    """The largest batch's tokens/s over batch 1's; and what it could reach were its passes nothing
    but their matmuls (the prefill left out): a ceiling set by the matmul kernels."""
    b1 = results.get("batch1")
    if len(batch_sizes) < 2 or not b1:
        return {}
    top_b = max(batch_sizes)
    top = results[f"batch{top_b}"]
    scaling = {"batch_scaling": top["tokens_per_s"] / b1["tokens_per_s"],
               "batch_scaling_matmul_bound": top["matmul_bound_tokens_per_s"] / b1["tokens_per_s"]}
    print(f"batch {top_b} / batch 1 tokens/s: {scaling['batch_scaling']:.2f}x (at most "
          f"{scaling['batch_scaling_matmul_bound']:.2f}x if batch {top_b}'s passes were their matmuls alone)")
    return scaling


def native_ops_speedup(results: dict[str, dict[str, Any]], batch_sizes: list[int]) -> dict[str, float]:
    speedup = {f"batch{b}": results[f"batch{b}"]["tokens_per_s"] / results[f"batch{b}_torch_ops"]["tokens_per_s"]
               for b in batch_sizes}
    print("native attention and confidence ops over SDPA and torch's ops (tokens/s): "
          + ", ".join(f"batch {b} {v:.2f}x" for b, v in zip(batch_sizes, speedup.values())))
    return speedup


def baseline_comparison(setup: Setup, rounds: Rounds, hf: Any, results: dict[str, dict[str, Any]],
                        repeats: int) -> dict[str, Any]:
    """The baseline's fastest run against our batch 1 (run here when batch 1 was not among the
    batch sizes): the speed-up, and how far the tokens agree."""
    base_runs = rounds.baseline or [run_baseline(hf, setup.prompts[0], setup.settings, setup.device)
                                    for _ in range(repeats)]
    base = fastest(base_runs)
    ours1 = results.get("batch1") or run_ours(setup.model, setup.prompts[:1], setup.ours_kw)
    same = ours1["out"][0] == base["out"]
    agree = next((i for i, (a, b) in enumerate(zip(ours1["out"][0], base["out"])) if a != b),
                 min(len(ours1["out"][0]), len(base["out"])))
    comparison = {"baseline": {k: v for k, v in base.items() if k != "out"}, "tokens_identical": same,
                  "tokens_agree_prefix": agree,  # bf16: kernels round differently; see RESULTS.md
                  "speedup": ours1["tokens_per_s"] / base["tokens_per_s"]}
    print(f"release-approach baseline (batch 1): {base['tokens_per_s']:9.1f} tok/s  "
          f"{base['passes_per_s']:8.1f} passes/s  {base['passes_per_token']:.3f} passes/token")
    print(f"speed-up (batch 1 tokens/s): {comparison['speedup']:.2f}x; tokens identical: {same} "
          f"(first {agree} agree)")
    return comparison


# --- the benchmark

def run_benchmark(args: argparse.Namespace, device: torch.device, fold: bool,
                  argv: list[str] | None = None) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = prepare(args, device)
    print_setup(setup, args, fold)
    variants = policy_variants(args)
    warm_up(setup, variants)
    read_rate = weight_read_ceiling(setup)
    hf = None if args.no_baseline else baseline_model(setup)
    rounds = timed_rounds(setup, variants, hf, args.repeats)
    results = our_results(setup, rounds, args.profile)
    if args.ab_torch_ops:
        results |= torch_ops_results(setup, rounds)
    summary = summary_of(args, setup, fold, read_rate, results, argv)
    summary |= batch_scaling(results, setup.batch_sizes)
    if args.ab_torch_ops:
        summary["native_ops_speedup"] = native_ops_speedup(results, setup.batch_sizes)
    if hf is not None:
        summary |= baseline_comparison(setup, rounds, hf, results, args.repeats)
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(pick_device(args.device))
    with using_policy(**policy_variants(args)[""]), inductor_kernel_records(args, device):
        return run_benchmark(args, device, folds_query_groups(device), argv)


if __name__ == "__main__":
    main()
