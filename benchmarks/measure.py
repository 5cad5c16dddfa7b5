"""What every benchmark here needs to measure: the machine's name, device-synced best-of timings,
and peak memory. Benchmarks in this folder import it by name (`from measure import ...`): run as
scripts, their own folder is on sys.path.
"""
from __future__ import annotations

import platform
import resource
import time
from typing import Any

import torch


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
