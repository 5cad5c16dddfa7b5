"""Decode speed: our engine against the release's approach, same weights, same prompts, one run.

    python benchmarks/decode.py --shape tiny --gen-length 256 --steps 256
    python benchmarks/decode.py --shape smol-135m --dtype bfloat16 --batch-sizes 1,16
    python benchmarks/decode.py --shape sdc-8b --device cuda --dtype bfloat16

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
import platform
import resource
import sys
import time
from typing import Any, Iterator
from unittest import mock

import torch

from ..config import PRESETS, ModelConfig
from ..kernels import (CPU_ATTENTION, CPU_CONFIDENCE, CPU_MATMUL, KERNELS, SWITCHES, confidence_ops,
                       native_ops)
from ..model import FOLD_QUERY_GROUPS, DiffCoderLM, decode_matmul_kernel
from ..runners import RUNNERS


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def best_seconds(fn: Any, device: torch.device, repeats: int, warmup: int = 0) -> float:
    """The fastest of `repeats` timed calls of `fn` (after `warmup` untimed ones), device synced."""
    best = float("inf")
    for i in range(warmup + repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            best = min(best, time.perf_counter() - t)
    return best


def alternating_best(sweeps: dict[str, Any], repeats: int) -> dict[str, float]:
    """Best seconds of each named function, after one warm-up call each, the functions taking turns
    call by call: on a machine whose speed drifts within seconds, each samples the same moments."""
    for sweep in sweeps.values():
        sweep()
    best = dict.fromkeys(sweeps, float("inf"))
    for _ in range(repeats):
        for name, sweep in sweeps.items():
            t0 = time.perf_counter()
            sweep()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure_bandwidth(device: torch.device, nbytes: int) -> dict[str, float]:
    """Best-of-5 read bandwidth in bytes/s of each way we have to read a buffer of `nbytes` once:
    a float32 sum, and on a CPU with AMX our matmul kernel streaming the same bytes as one weight
    (with one input row; its software prefetching reads faster than the sum on this project's
    VM). The limit a benchmark divides by is the fastest of them."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    rates = {"float32 sum": nbytes / best_seconds(buf.sum, device, repeats=5)}
    if device.type == "cpu" and (ops := native_ops()) is not None:
        k_pairs = 512  # the buffer read as AMX panels of 16 columns x 1024 features
        panels = buf.view(torch.bfloat16).view(-1, k_pairs, 16, 2)
        x = torch.zeros(1, 2 * k_pairs, dtype=torch.bfloat16)
        with torch.inference_mode():
            rates["AMX kernel"] = nbytes / best_seconds(
                lambda: ops.amx_linear(x, panels, panels.shape[0] * 16, None), device, repeats=5, warmup=1)
    return rates


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def weight_bytes_per_pass(model: DiffCoderLM) -> int:
    """Bytes every pass must read: all weights except an untied input embedding (only B rows of it)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def decode_matmuls(model: DiffCoderLM) -> list[tuple[Any, torch.Tensor]]:
    """(linear function, weight) of every matmul in one decode pass, in the model's order and with
    the kernels it uses (fused q/k/v and gate/up, prepacked on a CPU in bf16)."""
    mms = []
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        qkv = [att.qkv] if att.qkv is not None else [att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]
        gate_up = [mlp.gate_up] if mlp.gate_up is not None else [mlp.gate_proj.weight, mlp.up_proj.weight]
        mms += [(att.linear, w) for w in (*qkv, att.o_proj.weight)]
        mms += [(mlp.linear, w) for w in (*gate_up, mlp.down_proj.weight)]
    return [*mms, (model.linear, model.lm_head.weight)]


def matmul_only_passes_per_s(model: DiffCoderLM, rows: int, repeats: int = 5, head_rows: int | None = None) -> float:
    """Passes/s of a pass that were nothing but its matmuls (same kernels, same weights streamed
    once each, `rows` input rows, `head_rows` of them (default all) through the vocabulary
    projection): the ceiling for the whole pass on this machine, so a bandwidth shortfall splits
    into what the matmul kernels leave and what the rest of the pass adds."""
    device, mms = model.device, decode_matmuls(model)
    inputs = {w.shape[1]: torch.randn(1, rows, w.shape[1], device=device, dtype=model.dtype) for _, w in mms}
    head_x = inputs[model.lm_head.weight.shape[1]][:, :head_rows or rows]

    def sweep() -> None:
        for fn, w in mms[:-1]:
            fn(inputs[w.shape[1]], w, None)
        fn, w = mms[-1]
        fn(head_x, w, None)

    with torch.inference_mode():  # the warm-up sweep also packs weights not packed yet
        return 1.0 / best_seconds(sweep, device, repeats, warmup=1)


def matmul_bound_tokens_per_s(run: dict[str, Any], step_rate: float, commit_rate: float, blocks: int) -> float:
    """Tokens/s of `run` had each of its passes taken only its matmuls' time: per block, one fused
    commit pass (`commit_rate` passes/s; the first block's pass with the prefill counts as one)
    and the rest block steps (`step_rate`)."""
    per_block = run["nfe"] / blocks
    seconds = blocks * ((per_block - 1) / step_rate + 1 / commit_rate)
    return run["tokens"] / seconds


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


def _as_float32_bytes(flat: torch.Tensor) -> torch.Tensor:
    """The same bytes as float32 where they can be reinterpreted so (the fastest sum), else as they are."""
    if flat.element_size() == 2 and flat.numel() % 2 == 0:
        try:
            return flat.view(torch.float32)
        except RuntimeError:  # storage offset not aligned to 4 bytes
            pass
    return flat


def weight_read_passes_per_s(model: DiffCoderLM, repeats: int = 5) -> float:
    """Passes/s if a pass did nothing but read each of its matmul weights once, one op per weight
    (a float32 sum over the weight's bytes): the ceiling for any pass made of one kernel per
    matmul on this machine, below the single-buffer bandwidth by the cost of many separate,
    smaller reads."""
    views = [_as_float32_bytes(w.detach().reshape(-1)) for _, w in decode_matmuls(model)]

    def sweep() -> None:
        for v in views:
            v.sum()

    return 1.0 / best_seconds(sweep, model.device, repeats, warmup=1)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def native_ops_used(model: DiffCoderLM, confidence_dtype: torch.dtype, block_length: int) -> list[str]:
    """Which of the native CPU ops besides the matmuls (diffcoder/kernels) a decode of this model
    runs, asked of the same routing the model and the decoder use (under the folding policy the
    benchmark set)."""
    used = []
    with torch.inference_mode():
        step = torch.empty(1, block_length, model.config.hidden_size, dtype=model.dtype, device=model.device)
        if model.attention_route(step, block_length, None).native is not None:
            used.append("attention")
        if confidence_dtype == torch.float64 and confidence_ops(step[0]) is not None:
            used.append("confidence")
    return used


def run_ours(model: DiffCoderLM, prompts: list[list[int]], kw: dict[str, Any]) -> dict[str, Any]:
    from ..decode import BlockEvent, Decoding

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
    from .release_baseline import release_generate

    ids = torch.tensor([prompt], device=device)
    sync(device)
    t0 = time.perf_counter()
    out, nfe = release_generate(hf, ids, steps=kw["steps"], gen_length=kw["gen_length"],
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
    p.add_argument("--fold-query-groups", default="auto", choices=["auto", "on", "off"],
                   help="GQA attention with each KV head's query heads folded into one query (auto: the "
                        "device's default in diffcoder.model.FOLD_QUERY_GROUPS)")
    p.add_argument("--cpu-matmul", default="auto", choices=list(KERNELS),
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
    return " ".join([*env, "python benchmarks/decode.py", *(sys.argv[1:] if argv is None else argv)])


@contextlib.contextmanager
def native_policies(attention: str, confidence: str) -> Iterator[None]:
    """CPU_ATTENTION and CPU_CONFIDENCE set for a block (patch.dict restores them)."""
    with mock.patch.dict(CPU_ATTENTION, kernel=attention), mock.patch.dict(CPU_CONFIDENCE, kernel=confidence):
        yield


@contextlib.contextmanager
def query_group_folding(device_type: str, choice: str) -> Iterator[bool]:
    """FOLD_QUERY_GROUPS for `device_type` set to `choice` (auto: left as is) while the benchmark runs."""
    with mock.patch.dict(FOLD_QUERY_GROUPS, {} if choice == "auto" else {device_type: choice == "on"}):
        yield FOLD_QUERY_GROUPS.get(device_type, False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    # The policies hold for this run only (patch.dict restores them).
    # A compiled CPU step is otherwise one opaque entry in a profile: inductor can give each of its
    # fused C++ kernels a profiler record (set before anything compiles; restored afterwards).
    kernel_records = args.profile > 0 and args.runner.startswith("compiled") and device.type == "cpu"
    from torch._inductor import config as inductor_config
    with mock.patch.dict(CPU_MATMUL, kernel=args.cpu_matmul), native_policies(args.cpu_attention, args.cpu_confidence), \
            query_group_folding(device.type, args.fold_query_groups) as fold, \
            (inductor_config.patch({"cpp.enable_kernel_profile": True}) if kernel_records else contextlib.nullcontext()):
        return run_benchmark(args, device, fold, argv)


def run_benchmark(args: argparse.Namespace, device: torch.device, fold: bool,
                  argv: list[str] | None = None) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.model:
        from ..checkpoint import load

        model = load(args.model, device=device, dtype=dtype)
        label = args.model
    else:
        model = random_model(args.shape, dtype, device, args.seed)
        label = f"random {args.shape}"
    cfg = model.config
    gen = torch.Generator().manual_seed(args.seed)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    vocab_ok = [t for t in range(min(cfg.vocab_size, 5000)) if t != model.mask_id]
    prompts = [[vocab_ok[i] for i in torch.randint(len(vocab_ok), (args.prompt_len,), generator=gen).tolist()]
               for _ in range(max(batch_sizes))]
    kw = dict(steps=args.steps or args.gen_length, gen_length=args.gen_length, block_length=args.block_length,
              threshold=args.threshold, mask_id=model.mask_id, runner=args.runner,
              confidence_dtype=getattr(torch, args.confidence_dtype))
    if args.shift:
        if not args.no_baseline:
            raise SystemExit("--shift: the release-approach baseline has no correct shift decoding; add --no-baseline")
        kw["shift"] = True
    wbytes = weight_bytes_per_pass(model)
    readers = measure_bandwidth(device, 1 << 30 if device.type == "cpu" else 4 << 30)
    bandwidth = max(readers.values())
    hw = hardware_name(device)
    model.prepare_for_decoding()  # what every decode does first (idempotent); packs bf16 weights on a CPU
    matmul_kernel = decode_matmul_kernel(model)
    native = native_ops_used(model, kw["confidence_dtype"], kw["block_length"])
    print(f"hardware: {hw}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s (fastest of: "
          + ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in readers.items()) + ")"
          + (f"; decode matmuls on {matmul_kernel}" if matmul_kernel else "")
          + (f"; native {' and '.join(native)}" if native else ""))
    print(f"model: {label}, {cfg.num_parameters / 1e6:.1f}M params, {args.dtype}, {wbytes / 1e6:.1f} MB read per pass"
          f" -> limit {bandwidth / wbytes:.1f} passes/s; runner {args.runner}, query-group folding {fold}")
    ours_kw = {k: v for k, v in kw.items() if k != "mask_id"}
    # Warm-up: one untimed run per batch size with the timed settings, so that compiled runners
    # compile here (their graphs are specialised to the batch size and the cache length).
    # With --ab-torch-ops, every timed run is paired with one on SDPA and torch's confidence ops
    # (the compiled step is traced once per policy; dynamo keeps both).
    # Result key suffix -> (attention, confidence) policies.
    variants = {"": (args.cpu_attention, args.cpu_confidence)}
    if args.ab_torch_ops:
        variants["_torch_ops"] = ("torch", "torch")
    for b in batch_sizes:
        for policy in variants.values():
            with native_policies(*policy):
                run_ours(model, prompts[:b], ours_kw)
    read_rate = weight_read_passes_per_s(model)  # after the warm-up: the weights as decoding uses them
    print(f"reading each matmul weight once, one op per weight: {read_rate:8.1f} passes/s  "
          f"{100 * wbytes * read_rate / bandwidth:.0f}% of bandwidth limit")
    results: dict[str, Any] = {}
    hf, base_kw, base_runs = None, {**kw, "threshold": args.threshold}, []
    if not args.no_baseline:
        hf = hf_twin(model)
        run_baseline(hf, prompts[0], {**base_kw, "gen_length": args.block_length * 2, "steps": 2}, device)
    # Repeats go round every batch size (and policy) in turn, and batch 1 alternates with the
    # baseline: on a shared machine whose speed drifts, each setting then samples the same moments.
    runs: dict[str, list[dict[str, Any]]] = {}
    matmul_rates: dict[tuple[int, int], float] = {}  # (rows, head rows) -> best matmuls-alone passes/s
    for _ in range(args.repeats):
        for b in batch_sizes:
            for suffix, policy in variants.items():
                with native_policies(*policy):
                    runs.setdefault(f"batch{b}{suffix}", []).append(run_ours(model, prompts[:b], ours_kw))
            if hf is not None and b == 1:
                base_runs.append(run_baseline(hf, prompts[0], base_kw, device))
            # The matmuls alone of a block step and of a fused commit pass (twice the rows, the
            # vocabulary projection on the block's), timed in the same round as the decode.
            rows = b * args.block_length
            for key in ((rows, rows), (2 * rows, rows)):
                rate = matmul_only_passes_per_s(model, key[0], repeats=2, head_rows=key[1])
                matmul_rates[key] = max(matmul_rates.get(key, 0.0), rate)
    for b in batch_sizes:
        best = min(runs[f"batch{b}"], key=lambda r: r["seconds"])
        best["peak_memory_bytes"] = peak_memory(device)
        best["bandwidth_fraction"] = wbytes * best["passes_per_s"] / bandwidth
        rows = b * args.block_length
        best["matmul_only_passes_per_s"] = matmul_rates[rows, rows]
        best["matmul_only_bandwidth_fraction"] = wbytes * best["matmul_only_passes_per_s"] / bandwidth
        best["commit_matmul_only_passes_per_s"] = matmul_rates[2 * rows, rows]
        best["matmul_bound_tokens_per_s"] = matmul_bound_tokens_per_s(
            best, matmul_rates[rows, rows], matmul_rates[2 * rows, rows], args.gen_length // args.block_length)
        results[f"batch{b}"] = best
        print(f"ours   batch {b:3d}: {best['tokens_per_s']:9.1f} tok/s  {best['passes_per_s']:8.1f} passes/s  "
              f"{best['passes_per_token']:.3f} passes/token  first block {best['time_to_first_block_s'] * 1e3:.1f} ms"
              f"  {100 * best['bandwidth_fraction']:.0f}% of bandwidth limit")
        print(f"       its matmuls alone ({rows} rows): {best['matmul_only_passes_per_s']:8.1f}"
              f" passes/s  {100 * best['matmul_only_bandwidth_fraction']:.0f}% of bandwidth limit; "
              f"{2 * rows} rows (the fused commit pass): {best['commit_matmul_only_passes_per_s']:.1f} passes/s; "
              f"a decode of matmuls alone: {best['matmul_bound_tokens_per_s']:.1f} tok/s")
        if args.profile > 0:
            best["profile"] = profile_decode(model, prompts[:b], ours_kw, args.profile)
            print_profile(best["profile"])
    for b in batch_sizes if args.ab_torch_ops else []:
        best = min(runs[f"batch{b}_torch_ops"], key=lambda r: r["seconds"])
        best["bandwidth_fraction"] = wbytes * best["passes_per_s"] / bandwidth
        results[f"batch{b}_torch_ops"] = best
        print(f"ours with SDPA and torch's confidence ops, batch {b:3d}: {best['tokens_per_s']:9.1f} tok/s  "
              f"{best['passes_per_s']:8.1f} passes/s")
    summary: dict[str, Any] = {
        "hardware": hw, "device": device.type, "model": label, "dtype": args.dtype, "params": cfg.num_parameters,
        "weight_bytes_per_pass": wbytes, "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_readers": readers, "prompt_len": args.prompt_len,
        "gen_length": args.gen_length, "block_length": args.block_length, "steps": kw["steps"], "shift": args.shift,
        "threshold": args.threshold, "runner": args.runner, "confidence_dtype": args.confidence_dtype,
        "fold_query_groups": fold, "cpu_matmul": matmul_kernel, "native_ops": native,
        "weight_read_passes_per_s": read_rate,
        "weight_read_bandwidth_fraction": wbytes * read_rate / bandwidth,
        "ours": {k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in results.items()},
        "command": command_line(argv),
    }
    b1 = results.get("batch1")
    if len(batch_sizes) > 1 and b1:
        top = results[f"batch{max(batch_sizes)}"]
        summary["batch_scaling"] = top["tokens_per_s"] / b1["tokens_per_s"]
        # What the largest batch could reach over batch 1's measured rate if its passes were
        # nothing but their matmuls (the prefill left out): a ceiling set by the matmul kernels.
        summary["batch_scaling_matmul_bound"] = top["matmul_bound_tokens_per_s"] / b1["tokens_per_s"]
        print(f"batch {max(batch_sizes)} / batch 1 tokens/s: {summary['batch_scaling']:.2f}x (at most "
              f"{summary['batch_scaling_matmul_bound']:.2f}x if batch {max(batch_sizes)}'s passes were their "
              "matmuls alone)")
    if args.ab_torch_ops:
        summary["native_ops_speedup"] = {f"batch{b}": results[f"batch{b}"]["tokens_per_s"]
                                         / results[f"batch{b}_torch_ops"]["tokens_per_s"] for b in batch_sizes}
        print("native attention and confidence ops over SDPA and torch's ops (tokens/s): "
              + ", ".join(f"batch {b} {v:.2f}x" for b, v in zip(batch_sizes, summary["native_ops_speedup"].values())))
    if hf is not None:
        if not base_runs:
            base_runs = [run_baseline(hf, prompts[0], base_kw, device) for _ in range(args.repeats)]
        base = min(base_runs, key=lambda r: r["seconds"])
        ours1 = b1 or run_ours(model, prompts[:1], ours_kw)
        same = ours1["out"][0] == base["out"]
        agree = next((i for i, (a, b) in enumerate(zip(ours1["out"][0], base["out"])) if a != b),
                     min(len(ours1["out"][0]), len(base["out"])))
        summary["baseline"] = {k: v for k, v in base.items() if k != "out"}
        summary["tokens_identical"] = same
        summary["tokens_agree_prefix"] = agree  # bf16: kernels round differently; see RESULTS.md
        summary["speedup"] = ours1["tokens_per_s"] / base["tokens_per_s"]
        print(f"release-approach baseline (batch 1): {base['tokens_per_s']:9.1f} tok/s  "
              f"{base['passes_per_s']:8.1f} passes/s  {base['passes_per_token']:.3f} passes/token")
        print(f"speed-up (batch 1 tokens/s): {summary['speedup']:.2f}x; tokens identical: {same} "
              f"(first {agree} agree)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
