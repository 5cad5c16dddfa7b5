"""How the engine runs one model pass: eagerly, or replayed from a captured CUDA graph.

Both compute the same thing: the pass over columns [qs, we) of the batch (clean columns
[qs, ws) are kept in the KV cache, the noisy block [ws, we) is not), returning the logits at
`idx`. Both write the pass's keys and values through `KVCache.update`: the eager runner at the
columns after the committed ones, the static runner at fixed cache columns given by an index
tensor (`cache_cols`), attention then spanning every cache column with the mask hiding the rest.
With those static shapes a pass can be compiled and captured as a CUDA graph, so its per-pass
Python and kernel-launch overhead disappears (gpt-fast style). Graphs are keyed by (batch,
query length, logits slice), so a decode needs two: the plain block step and the fused
commit+block step; the one-off prefill runs eagerly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import RUNNERS
from ..kernels.linear import decode_matmul_kernel
from ..masks import decode_mask

__all__ = ["RUNNERS", "EagerRunner", "StaticRunner", "make_runner"]


class EagerRunner:
    """Eager passes over the exact columns needed; the block's mask and the rotary tables are built
    once and reused by every step (they change only when the block or the batch does)."""
    cache_bucket = 1
    fuses_choice = False  # a choice rule runs after the pass, as plain eager ops
    narrows_logits = True  # any logits slice costs nothing extra (no graph per slice)

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._mask_key: tuple | None = None
        self._mask: torch.Tensor | str | None = None
        self._rope_src: torch.Tensor | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, key_valid: torch.Tensor, cache, qs: int, ws: int,
                 we: int, block: int, idx: slice, choice: tuple | None = None):  # noqa: ANN204
        """The logits at `idx`, or with `choice=(rule, *args)` what `rule(logits, *args)` returns."""
        if self._mask_key is None or self._mask_key[:2] != (qs, we) or self._mask_key[2] is not key_valid:
            cols = torch.arange(we, device=x.device)
            mask = decode_mask(cols[qs:we], cols, key_valid[:, :we], block)
            self._mask = "full" if bool(mask.all()) else mask  # no mask at all: SDPA's fast path
            self._mask_key = (qs, we, key_valid)
        if pos is not self._rope_src:
            self._rope = self.model.rotary(pos, self.model.dtype)
            self._rope_src = pos
        cos, sin = self._rope
        logits = self.model(x[:, qs:we], pos[:, qs:we], attn_mask=self._mask, cache=cache, keep=ws - qs,
                            logits_index=idx, rope=(cos[:, :, qs:we], sin[:, :, qs:we]))
        return logits if choice is None else choice[0](logits, *choice[1:])


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    cols: torch.Tensor  # the cache columns the pass writes its keys and values to
    logits: torch.Tensor
    at: tuple  # (qs, we, key_valid) the static inputs other than the token ids were built for
    # The rotary tables of `pos`, built once per block like the mask: computed inside a compiled
    # pass, inductor would fuse their cos/sin into every layer's rotary kernel and recompute them.
    cos: torch.Tensor
    sin: torch.Tensor


class StaticRunner:
    """Static-shape passes; with `graphs=True` each shape is captured once as a CUDA graph and
    replayed. Without graphs (any device) it runs the same static computation eagerly, which is
    how the tests check the static path on a CPU."""

    # The decode's buffers and cache are allocated in multiples of this many columns, so that
    # sequences of different lengths share compiled graphs and captured CUDA graphs (the graphs
    # attend over every cache column; the extra ones are masked, and strides stay the same).
    cache_bucket = 64
    narrows_logits = False  # each logits slice would be another graph to compile and capture

    def __init__(self, model: torch.nn.Module, max_query: int, graphs: bool, compile: bool = False) -> None:
        self.model = model
        self.use_graphs = graphs
        # torch.compile fuses the small elementwise kernels (norms, rotary, SwiGLU, residuals) that
        # otherwise dominate a 4-token pass; the graph then replays the fused kernels.
        self.compile = compile
        # Without CUDA graphs a compiled step can also take the decoding rule (see
        # decode.greedy_choice): one compiled call then does the pass and the commit choice.
        self.fuses_choice = compile and not graphs
        self.steps: dict = {}  # rule (None: logits only) -> its step function, looked up once per rule
        self.eager = EagerRunner(model)
        self.max_query = max_query  # longer passes (the prefill) run eagerly
        self.graphs: dict[tuple, _Graph] = {}
        self.cache_id: int | None = None

    def __call__(self, x, pos, key_valid, cache, qs, ws, we, block, idx, choice=None):  # noqa: ANN001, ANN204
        """The logits at `idx`; with `choice=(rule, *args)` (only when `fuses_choice`), what
        `rule(logits, *args)` returns, computed inside the compiled step."""
        q = we - qs
        if q > self.max_query:
            return self.eager(x, pos, key_valid, cache, qs, ws, we, block, idx, choice)
        rule, args = (None, ()) if choice is None else (choice[0], choice[1:])
        if id(cache.k) != self.cache_id:  # rows left the batch: the cache was reallocated
            self.graphs.clear()
            self.cache_id = id(cache.k)
        key = (x.shape[0], q, idx.start, idx.stop)
        g = self.graphs.get(key)
        fresh = g is None
        at = (qs, we, key_valid)
        if fresh or g.at[:2] != at[:2] or g.at[2] is not key_valid:
            # Mask, positions and write columns change only with the block: not on every step.
            cols = torch.arange(cache.max_len, device=x.device)
            mask = decode_mask(cols[qs:we], cols, key_valid[:, :cache.max_len] & (cols < we), block)
            if fresh:
                # Contiguous copies: their strides must not depend on the decode's length (a
                # compiled step guards on strides and would recompile for every new length).
                g_pos = pos[:, qs:we].clone(memory_format=torch.contiguous_format)
                g = _Graph(None, x[:, qs:we].clone(memory_format=torch.contiguous_format), g_pos, mask,
                           torch.arange(qs, we, device=x.device), None, at,
                           *self.model.rotary(g_pos, self.model.dtype))
            else:
                g.pos.copy_(pos[:, qs:we])
                g.mask.copy_(mask)
                g.cols.copy_(cols[qs:we])
                for table, new in zip((g.cos, g.sin), self.model.rotary(g.pos, self.model.dtype)):
                    table.copy_(new)
                g.at = at
        if not fresh:
            g.ids.copy_(x[:, qs:we])
        if not self.use_graphs:
            out = self._step(rule)(g.ids, g.pos, g.mask, cache, g.cols, idx, (g.cos, g.sin), *args)
        else:
            if fresh:
                self._capture(g, cache, idx)
            g.graph.replay()
            out = g.logits
        self.graphs[key] = g
        cache.length = ws  # the clean columns [qs, ws) are committed, the block's are scratch
        return out

    def _step(self, rule: functools.partial | None):  # noqa: ANN202
        fn = self.steps.get(rule)
        if fn is None:
            fn = self.steps[rule] = compiled_step(self.model, rule) if self.compile else static_step(self.model, rule)
        return fn

    def _capture(self, g: _Graph, cache, idx: slice) -> None:  # noqa: ANN001
        step = self._step(None)

        def run() -> torch.Tensor:
            return step(g.ids, g.pos, g.mask, cache, g.cols, idx, (g.cos, g.sin))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (compile, allocator, kernels); rewrites the same keys each time
                run()
        torch.cuda.current_stream().wait_stream(side)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph):
            g.logits = run()


def static_step(model: torch.nn.Module, rule: functools.partial | None = None):  # noqa: ANN201
    """The static-shape pass as a function of its buffers: the logits at `idx`, or with a rule
    what `rule(logits, *args)` returns."""
    def step(ids, pos, mask, cache, cols, idx, rope, *args):  # noqa: ANN001, ANN002, ANN202
        logits = model.forward(ids, pos, attn_mask=mask, cache=cache, cache_cols=cols, logits_index=idx, rope=rope)
        return logits if rule is None else rule(logits, *args)

    return step


def compiled_step(model: torch.nn.Module, rule: functools.partial | None = None):  # noqa: ANN201
    """`static_step` compiled for static shapes, built once per model and rule (its keyword
    arguments: mask id, threshold, confidence dtype) and shared by every decode.

    A fresh `torch.compile` per request would recompile (the compiled code is keyed by the
    wrapper) and soon hit dynamo's recompile limit. On a CPU the step is compiled with inductor's
    C++ wrapper (the per-pass Python that launches each fused kernel disappears: a CPU has no
    CUDA graphs); in bf16 its matmuls run the kernels of eager mode through opaque ops
    (`packed_linear` in kernels/linear.py).
    """
    steps = model.__dict__.setdefault("_compiled_steps", {})
    key = None if rule is None else (rule.func, tuple(sorted(rule.keywords.items())))
    fn = steps.get(key)
    if fn is None:
        # Static shapes: each (batch, query length, logits slice) is its own graph, and a server
        # sees many batch sizes; dynamo's default of 8 graphs per function would fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = steps[key] = torch.compile(static_step(model, rule), dynamic=False, options=_compile_options(model))
    return fn


def _compile_options(model: torch.nn.Module) -> dict:
    """On a CPU, inductor's C++ wrapper where it pays: it removes the per-pass Python that launches
    each fused kernel and extern op (a CPU has no CUDA graphs to hide it), but its one C++ file per
    graph grows with the layer count, and a 30-layer step's first compile takes minutes (inductor
    caches it on disk for later processes). Small models always gain. A larger model gains when its
    bf16 matmuls run one of our kernels (AMX or AVX-512), C++ ops; oneDNN's prepacked matmul is a
    Python-implemented op, which the C++ wrapper calls back into Python for, and gains it nothing."""
    if model.device.type != "cpu":
        return {}
    small = model.parameter_bytes() <= _CPP_WRAPPER_MAX_BYTES
    return {"cpp_wrapper": small or decode_matmul_kernel(model.linear) in ("amx", "avx512")}


_CPP_WRAPPER_MAX_BYTES = 64 << 20


def make_runner(model: torch.nn.Module, block: int, runner: str = "auto") -> EagerRunner | StaticRunner:
    """auto: CUDA graphs on a GPU, eager elsewhere."""
    on_cuda = model.device.type == "cuda"
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}: use one of {', '.join(RUNNERS)}")
    if runner == "auto":
        runner = "cuda_graph" if on_cuda else "eager"
    graphs = runner.endswith("cuda_graph")
    if graphs and not on_cuda:
        raise ValueError(f"runner={runner!r} needs the model on a CUDA device")
    if runner == "eager":
        return EagerRunner(model)
    return StaticRunner(model, max_query=2 * block, graphs=graphs, compile=runner.startswith("compiled"))
