"""The block-diffusion decoding engine: exact release semantics, batched, streaming.

It knows only token ids and the model interface (`forward(ids, positions, attn_mask=,
cache=, keep=, logits_index=)`). The published decoder's rules (see
docs/decoding.md) are kept exactly, its defects are not:

* Blocks are aligned to each row's position 0; rows of different prompt lengths are left-padded
  by multiples of B so that every row's block boundaries fall on the same columns, and one
  window [ws, ws + B) serves all rows at each step.
* Per block, step j of s commits m//s tokens (the first m%s steps one more), zero-token steps
  are skipped; with a threshold, the top-1 plus every position with confidence >= threshold,
  until the block has no mask left (the release could run out of steps and crash).
* The mask token is never chosen (the release could choose it and never finish the block);
  confidences still come from the full distribution.
* The commit pass of a finished block is fused into the next block's first step: the clean
  block and the next masked block go through one forward with the block-causal mask; only
  the clean block's keys are kept (identical to two passes, one fewer forward per block).
* shift=True: the logits for column i come from column i - 1, including the block's first
  column (from the preceding committed token, whose logits do not change within the block).
* When a block is complete and contains EOS in its generated part, that row stops.
* Leftmost first at one token per pass, a pass projects onto the vocabulary only the column every
  row picks, when they agree (`_propose_column`): no rule reads the other columns' logits.
  AR mode (B = 1, shift) leaves the masked column out of the pass (`_pass`).
* speculative=True (greedy, one token per pass): the same tokens in fewer passes. Each pass
  verifies the previous pass's drafts for the block's next positions (`_speculative_window`).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..config import REMASKING
from ..masks import block_copies_mask
from .rules import block_schedule, commit_rule, committed_window, confidence_ranks, greedy_choice, propose
from .runners import make_runner
from .settings import MODEL_DEFAULT, resolve, speculative_applies


@dataclass
class StepEvent:
    """One denoising step of one row: which generated positions were committed, and how sure."""
    row: int
    step: int
    block_index: int
    positions: list[int]
    tokens: list[int]
    confidences: list[float]


@dataclass
class BlockEvent:
    """Newly final generated tokens of one row (offset `start` into its generated region)."""
    row: int
    block_index: int
    start: int
    tokens: list[int]
    finished: bool
    finish_reason: str | None = None


@dataclass
class GenerateResult:
    tokens: list[list[int]]
    nfe: int
    finish_reasons: list[str] = field(default_factory=list)
    texts: list[str] | None = None  # `generate` with text prompts: each row's text, EOS dropped


@dataclass(frozen=True)
class DecodeArgs:
    steps: int
    gen_length: int
    block_length: int = 4
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    shift: bool = False
    eos_id: int | None = None
    mask_id: int | None = None
    seed: int | None = None
    max_active_blocks: int = 1
    block_add_threshold: float = 0.5
    speculative: bool = False

    @property
    def steps_per_block(self) -> int:
        return self.steps // (self.gen_length // self.block_length)


def validate_args(args: DecodeArgs, prompts: list[list[int]], vocab_size: int | None = None,
                  max_positions: int | None = None) -> None:
    """Raise ValueError with a message that says what to fix; called before any compute."""
    def bad(msg: str) -> None:
        raise ValueError(msg)

    if not isinstance(args.gen_length, int) or args.gen_length <= 0:
        bad(f"gen_length must be a positive integer, got {args.gen_length!r}")
    if not isinstance(args.block_length, int) or args.block_length <= 0:
        bad(f"block_length must be a positive integer, got {args.block_length!r}")
    if args.gen_length % args.block_length:
        bad(f"gen_length ({args.gen_length}) must be a multiple of block_length ({args.block_length})")
    n_blocks = args.gen_length // args.block_length
    if not isinstance(args.steps, int) or args.steps <= 0 or args.steps % n_blocks:
        bad(f"steps ({args.steps}) must be a positive multiple of gen_length/block_length = {n_blocks} "
            f"(e.g. steps={n_blocks} for {args.block_length} tokens per step, or {args.gen_length} for one)")
    if args.remasking not in REMASKING:
        bad(f"unknown remasking {args.remasking!r}: use one of {', '.join(REMASKING)}")
    if args.threshold is not None and not (0.0 < float(args.threshold) <= 1.0):
        bad(f"threshold must be in (0, 1] or None, got {args.threshold!r}")
    if not isinstance(args.temperature, (int, float)) or args.temperature < 0 or math.isnan(args.temperature):
        bad(f"temperature must be >= 0, got {args.temperature!r}")
    if args.mask_id is None:
        bad("no mask token id: pass mask_id= or load a checkpoint whose config/tokenizer names one")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        bad("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            bad(f"prompt {i} is empty: give at least one token (e.g. the BOS token)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad(f"prompt {i} must be a list of integer token ids")
        if vocab_size is not None and (min(p) < 0 or max(p) >= vocab_size):
            bad(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size})")
        if max_positions is not None and len(p) + args.gen_length > max_positions:
            bad(f"prompt {i}: {len(p)} prompt tokens + gen_length {args.gen_length} exceed the model's context "
                f"of {max_positions} positions; shorten the prompt or lower gen_length")
    if not isinstance(args.max_active_blocks, int) or args.max_active_blocks < 1:
        bad(f"max_active_blocks must be an integer >= 1, got {args.max_active_blocks!r}")
    if args.max_active_blocks > 1:
        if args.threshold is None:
            bad("multi-block pipelining (max_active_blocks > 1) commits later blocks by confidence: "
                "give a threshold too (e.g. threshold=0.9)")
        if args.remasking == "left_to_right":
            bad("multi-block pipelining commits by confidence across blocks: use remasking low_confidence "
                "or random with max_active_blocks > 1")
        if not 0.0 < float(args.block_add_threshold) <= 1.0:
            bad(f"block_add_threshold must be in (0, 1], got {args.block_add_threshold!r}")
    if args.speculative and not speculative_applies(
            temperature=args.temperature, remasking=args.remasking, threshold=args.threshold, steps=args.steps,
            gen_length=args.gen_length, max_active_blocks=args.max_active_blocks):
        bad("speculative decoding reproduces greedy one-token-per-pass decoding: use temperature 0, remasking "
            f"low_confidence or left_to_right, no threshold, no pipelining and steps >= gen_length ({args.gen_length})")
    for name in ("eos_id", "mask_id"):
        v = getattr(args, name)
        if v is not None and vocab_size is not None and not 0 <= v < vocab_size:
            bad(f"{name} {v} is outside the vocabulary [0, {vocab_size})")


class Decoding:
    """Streaming decode of a batch of prompts. Iterate for events; `.result` afterwards."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], *, steps: int, gen_length: int,
                 block_length: int = 4, temperature: float = 0.0, remasking: str = "low_confidence",
                 threshold: float | None = None, shift: bool = False, eos_id: int | None = None,
                 mask_id: int | None = None, seed: int | None = None, step_events: bool = False,
                 confidence_dtype: torch.dtype = torch.float64, runner: str = "auto",
                 max_active_blocks: int = 1, block_add_threshold: float = 0.5, speculative: bool = False) -> None:
        mask_id = mask_id if mask_id is not None else getattr(model, "mask_id", None)
        self.args = DecodeArgs(steps, gen_length, block_length, float(temperature), remasking, threshold, shift,
                               eos_id, mask_id, seed, max_active_blocks, block_add_threshold, speculative)
        cfg = model.config
        validate_args(self.args, prompts, cfg.vocab_size, cfg.max_position_embeddings)
        self.model = model
        self.prompts = [list(p) for p in prompts]
        self.step_events = step_events
        if hasattr(model, "prepare_for_decoding") and not model.training:
            model.prepare_for_decoding()  # fused projections (views: free); packed weights on CPU bf16
        self.runner = make_runner(model, block_length, runner)
        self.confidence_dtype = confidence_dtype
        # Greedy low-confidence decoding (the common case) is a pure function of the logits: a
        # compiled runner traces it into the step (see `greedy_choice`).
        self._fused_choice = None
        if self.runner.fuses_choice and temperature == 0 and remasking == "low_confidence" and not shift:
            self._fused_choice = functools.partial(greedy_choice, mask_id=mask_id, threshold=threshold,
                                                   dtype=confidence_dtype)
        # AR decoding (B = 1 with shift): the window's logits come from the column before it and no
        # column attends to the masked one, so a pass stops before it (one row per sequence).
        self._ar_passes = shift and block_length == 1 and max_active_blocks == 1
        self.nfe = 0
        self._cancelled: set[int] = set()
        self._tokens: list[list[int]] = [[] for _ in prompts]
        self._reasons: list[str] = ["length"] * len(prompts)
        self.result: GenerateResult | None = None
        self._gen = torch.Generator(device=model.device)
        self._gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def cancel(self, row: int) -> None:
        """Stop decoding `row` at the next block boundary (its slot stops costing compute)."""
        self._cancelled.add(row)

    # ------------------------------------------------------------------ setup
    def _layout(self) -> None:
        a, dev = self.args, self.model.device
        B, G = a.block_length, a.gen_length
        lens = torch.tensor([len(p) for p in self.prompts])
        rem = lens % B
        full = lens - rem
        self.c = int(full.max())  # first window column, shared by all rows
        pad = self.c - full
        self.n_windows = -(-(int(rem.max()) + G) // B)
        bucket = self.runner.cache_bucket  # static-shape runners: one graph serves many lengths
        # A speculative pass writes up to B copies of the block as scratch after the cache.
        scratch = B * (B - 1) if a.speculative else 0
        T = -(-(self.c + B * self.n_windows + scratch) // bucket) * bucket  # columns past the last window stay unused
        n = len(self.prompts)
        cols = torch.arange(T)
        x = torch.full((n, T), a.mask_id, dtype=torch.long)
        for i, p in enumerate(self.prompts):
            x[i, pad[i]:pad[i] + len(p)] = torch.tensor(p)
        gen_start = self.c + rem
        gen_end = gen_start + G
        self.x = x.to(dev)
        self.pos = (cols[None] - pad[:, None]).clamp_min(0).to(dev)
        self.key_valid = ((cols[None] >= pad[:, None]) & (cols[None] < gen_end[:, None])).to(dev)
        self.masked = ((cols[None] >= gen_start[:, None]) & (cols[None] < gen_end[:, None])).to(dev)
        self.gen_start, self.gen_end = gen_start.tolist(), gen_end.tolist()
        self.rows = list(range(n))  # original index of each active batch row
        self.cache = self.model.new_cache(n, T)
        self.lead_logits: torch.Tensor | None = None  # shift mode: logits for the window's first column

    # ------------------------------------------------------------------- loop
    def __iter__(self) -> Iterator[StepEvent | BlockEvent]:
        self._layout()
        B = self.args.block_length
        commit_from = 0  # columns [commit_from, ws) are clean and not yet in the cache
        with torch.inference_mode():
            if self.args.max_active_blocks > 1:
                yield from self._pipelined()
            else:
                for w in range(self.n_windows):
                    if not self.rows:
                        break
                    ws = self.c + w * B
                    decode = self._speculative_window if self.args.speculative else self._decode_window
                    yield from decode(w, ws, commit_from)
                    yield from self._finish_window(w, ws)
                    commit_from = ws
        self.result = GenerateResult(self._tokens, self.nfe, self._reasons)

    def _decode_window(self, w: int, ws: int, commit_from: int) -> Iterator[StepEvent]:
        a = self.args
        we = ws + a.block_length
        # Masked counts per row follow from the layout alone (no device sync needed).
        counts = [max(0, min(we, self.gen_end[r]) - max(ws, self.gen_start[r])) for r in self.rows]
        schedules = [block_schedule(m, a.steps_per_block) for m in counts]
        n_steps = max(len(s) for s in schedules)
        if a.threshold is None:
            # [step, row]: each step's k is a fresh-strided [rows, 1] column whatever the block's
            # step count (a compiled step guards on strides).
            table = torch.tensor([s + [0] * (n_steps - len(s)) for s in schedules], device=self.x.device).T.clone(
                memory_format=torch.contiguous_format)
        # Leftmost first, one token per pass: each row's pick at step s is its first masked column + s.
        narrow = (a.threshold is None and a.remasking == "left_to_right" and self.runner.narrows_logits
                  and all(n == 1 for sched in schedules for n in sched))
        firsts = [max(ws, self.gen_start[r]) - ws for r in self.rows]
        step = 0
        while True:
            if a.threshold is None:
                if step == n_steps:
                    return
                k = table[step].unsqueeze(1)
            else:
                remaining = self.masked[:, ws:we].any(1)
                if not bool(remaining.any()):
                    return
                k = None
            qs = commit_from if step == 0 else ws
            col = self._common_pick(firsts, counts, step, ws, qs) if narrow else None
            committed, conf, x0 = self._step(ws, we, qs, k, col)
            if self.step_events:
                yield from self._step_events(w, step, ws, committed, conf, x0)
            step += 1

    def _common_pick(self, firsts: list[int], counts: list[int], step: int, ws: int, qs: int) -> int | None:
        """The window column every row still decoding picks at this step (leftmost first, one per
        pass), if they agree and its logits come from a column of this pass; else None."""
        cols = {first + step for first, count in zip(firsts, counts) if step < count}
        if len(cols) != 1:
            return None
        col = cols.pop()
        return col if ws - qs + col - self.args.shift >= 0 else None

    def _logits_index(self, ws: int, we: int, qs: int) -> slice:
        if self.args.shift and ws > qs:
            return slice(ws - qs - 1, we - qs - 1)  # column i's logits come from column i - 1
        if self.args.shift:
            return slice(0, we - qs - 1)
        return slice(ws - qs, we - qs)

    def _step(self, ws: int, we: int, qs: int, k: torch.Tensor | None, col: int | None = None):
        """One pass and one commit (release rules); fused into one compiled call when the runner can.
        `col`: the one window column whose logits the rule reads (see `_propose_column`)."""
        a = self.args
        masked = self.masked[:, ws:we]
        if self._fused_choice is None:
            if col is not None:
                conf, x0 = self._propose_column(ws, we, qs, col, masked)
            else:
                conf, x0 = self._propose(self._forward(ws, we, qs), masked)
            select = commit_rule(conf, masked, k, a.threshold, left_to_right=a.remasking == "left_to_right")
            return self._apply(select, x0, ws, we), conf, x0
        select, conf, x0, tokens, still_masked = self._pass(ws, we, qs, (self._fused_choice, masked, k,
                                                                          self.x[:, ws:we]))
        self._write(ws, we, tokens, still_masked)
        return select, conf, x0

    def _pass(self, ws: int, we: int, qs: int, choice: tuple | None = None,
              index: slice | None = None, clean_only: bool = False):  # noqa: ANN202
        """One model pass over columns [qs, we): [qs, ws) clean (kept in cache), [ws, we) noisy;
        the logits at the window (or at the pass's columns `index`), or what the choice rule makes
        of them (see StaticRunner). `clean_only`: the pass stops before the noisy block (only
        logits of clean columns are read, and clean columns never attend to the noisy block)."""
        assert self.cache.length == qs
        a = self.args
        index = self._logits_index(ws, we, qs) if index is None else index
        end = ws if (self._ar_passes or clean_only) and ws > qs else we
        out = self.runner(self.x, self.pos, self.key_valid, self.cache, qs, ws, end, a.block_length, index, choice)
        self.nfe += 1
        return out

    def _forward(self, ws: int, we: int, qs: int) -> torch.Tensor:
        """The pass's logits, with shift mode's leading column restored."""
        a = self.args
        logits = self._pass(ws, we, qs)
        if a.shift:
            if ws > qs:
                self.lead_logits = logits[:, :1].clone()  # constant while this block is decoded
            else:
                lead = self.lead_logits if self.lead_logits is not None else torch.zeros_like(logits[:, :1])
                logits = torch.cat([lead, logits], dim=1)
        return logits

    def _propose_column(self, ws: int, we: int, qs: int, col: int,
                        masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_propose` when every row picks window column `col` (leftmost first, one per pass): the
        pass projects only that column onto the vocabulary (at B = 4 the LM head is about a quarter
        of a pass's matmul work, and no rule reads the other columns' logits); the other masked
        positions get confidence -inf and the mask token, like decoded ones. With shift, column 0's
        logits come from the last clean column, so the block's first pass leaves out the noisy
        block (half the rows of that pass at B = 4), as an AR decoder's pass does."""
        a = self.args
        out = ws - qs + col - a.shift  # with shift, column i's logits come from column i - 1
        logits = self._pass(ws, we, qs, index=slice(out, out + 1), clean_only=out < ws - qs)
        if a.shift and ws > qs:  # the block's first pass: the lead, if this is column 0
            self.lead_logits = logits.clone() if col == 0 else None  # else column 0 is never masked here
        conf_col, x0_col = self._propose(logits, masked[:, col:col + 1])
        conf = torch.full(masked.shape, float("-inf"), dtype=conf_col.dtype, device=masked.device)
        x0 = torch.full(masked.shape, a.mask_id, dtype=x0_col.dtype, device=masked.device)
        conf[:, col:col + 1] = conf_col
        x0[:, col:col + 1] = x0_col
        return conf, x0

    def _apply(self, select: torch.Tensor, x0: torch.Tensor, ws: int, we: int) -> torch.Tensor:
        """Write the selected tokens into columns [ws, we) and unmask them."""
        self._write(ws, we, *committed_window(select, x0, self.x[:, ws:we], self.masked[:, ws:we]))
        return select

    def _write(self, ws: int, we: int, tokens: torch.Tensor, still_masked: torch.Tensor) -> None:
        self.x[:, ws:we] = tokens
        self.masked[:, ws:we] = still_masked

    def _propose(self, logits: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        return propose(logits, masked, mask_id=a.mask_id, temperature=a.temperature, remasking=a.remasking,
                       dtype=self.confidence_dtype, generator=self._gen)

    # --------------------------------------------- speculative: drafts verified in copies (exact)
    def _speculative_window(self, w: int, ws: int, commit_from: int) -> Iterator[StepEvent]:
        """One token per pass, exactly, in fewer passes (greedy; docs/decoding.md, *Speculative*).

        A pass proposes a token at every masked position; the first one the rule picks is
        committed, the others are drafts: the rule's next picks and their tokens, if committing
        one token changes nothing else. The next pass runs the block in copies, copy j with the
        first j drafts filled in (each copy sees the cached prefix and itself). Copy 0 is the
        one-token-per-pass step; while copy j's pick equals draft j, copy j + 1 was the true
        state too and its pick is committed as well. So a pass commits 1 + the accepted drafts,
        the tokens are those of one token per pass, and the last true copy gives the new drafts.
        """
        a = self.args
        we = ws + a.block_length
        logits = self._forward(ws, we, commit_from)  # the block's first pass (fused commit pass)
        drafts: list[list[tuple[int, int]]] = [[] for _ in self.rows]
        step = 0
        while True:
            masked = self.masked[:, ws:we]
            n_copies = int(masked.sum(1).max())
            if n_copies == 0:
                return
            if not step:
                n_copies = 1  # no drafts yet: the block's first pass ran it once
            ids, copies = self._draft_copies(ws, we, drafts, n_copies)
            if step:
                logits = self._verify_pass(ws, we, ids)
            rows = len(self.rows)
            conf, x0 = self._propose(logits.reshape(rows * n_copies, a.block_length, -1),
                                     copies.reshape(rows * n_copies, -1))
            conf = conf.view(rows, n_copies, -1).tolist()
            x0 = x0.view(rows, n_copies, -1).tolist()
            tokens, still = self.x[:, ws:we].tolist(), masked.tolist()
            commits = []
            for b in range(rows):
                done, drafts[b] = self._accept(conf[b], x0[b], still[b], drafts[b])
                for p, t, _ in done:
                    tokens[b][p], still[b][p] = t, False
                commits.append(done)
            self._write(ws, we, torch.tensor(tokens, device=self.x.device),
                        torch.tensor(still, device=self.x.device))
            if self.step_events:
                for b, row in enumerate(self.rows):
                    if commits[b]:
                        yield StepEvent(row, step, w, [ws + p - self.gen_start[row] for p, _, _ in commits[b]],
                                        [t for _, t, _ in commits[b]], [c for _, _, c in commits[b]])
            step += 1

    def _accept(self, conf: list[list[float]], x0: list[list[int]], masked: list[bool],
                drafts: list[tuple[int, int]]) -> tuple[list[tuple[int, int, float]], list[tuple[int, int]]]:
        """One row: the commits (position, token, confidence) copy by copy while the drafts hold,
        and the new drafts from the last true copy."""
        open_ = [p for p, m in enumerate(masked) if m]
        done: list[tuple[int, int, float]] = []
        for j in range(len(open_)):
            filled = {p for p, _ in drafts[:j]}
            left = [p for p in open_ if p not in filled]
            order = self._rule_order(conf[j], left)
            pick = order[0]
            done.append((pick, x0[j][pick], conf[j][pick]))
            if j >= len(drafts) or drafts[j] != (pick, x0[j][pick]):
                return done, [(p, x0[j][p]) for p in order[1:]]
        return done, []

    def _rule_order(self, conf: list[float], positions: list[int]) -> list[int]:
        """The order in which one token per pass would commit `positions`, judged by one pass:
        leftmost first, or most confident first (ties: leftmost, as `confidence_ranks`)."""
        if self.args.remasking == "left_to_right":
            return positions
        return sorted(positions, key=lambda p: (-conf[p], p))

    def _draft_copies(self, ws: int, we: int, drafts: list[list[tuple[int, int]]],
                      n_copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block in `n_copies` copies per row, copy j with the row's first j drafts filled in:
        token ids and masked flags, [rows, n_copies, B] each."""
        ids = self.x[:, ws:we].unsqueeze(1).repeat(1, n_copies, 1)
        masked = self.masked[:, ws:we].unsqueeze(1).repeat(1, n_copies, 1)
        for b, row_drafts in enumerate(drafts):
            for i, (p, t) in enumerate(row_drafts[:n_copies - 1]):
                ids[b, i + 1:, p] = t
                masked[b, i + 1:, p] = False
        return ids, masked

    def _verify_pass(self, ws: int, we: int, copies: torch.Tensor) -> torch.Tensor:
        """Logits [rows, n_copies, B, vocab] of the block's copies [rows, n_copies, B] in one pass
        (their keys are scratch past the cache)."""
        a = self.args
        B = a.block_length
        assert self.cache.length == ws
        n_copies = copies.shape[1]
        mask = block_copies_mask(self.key_valid[:, :ws], self.key_valid[:, ws:we], n_copies)
        # With shift a copy's last column predicts past the block: its vocabulary projection is skipped.
        cols = torch.arange(n_copies * B, device=copies.device)
        index = cols[cols % B < B - 1] if a.shift else None
        logits = self.model(copies.flatten(1), self.pos[:, ws:we].repeat(1, n_copies), attn_mask=mask,
                            cache=self.cache, keep=0, logits_index=index)
        self.nfe += 1
        if not a.shift:
            return logits.view(len(self.rows), n_copies, B, -1)
        # Column i's logits come from column i - 1; a block's first column from the lead.
        logits = logits.view(len(self.rows), n_copies, B - 1, -1)
        lead = self.lead_logits if self.lead_logits is not None else torch.zeros_like(logits[:, 0, :1])
        return torch.cat([lead.unsqueeze(1).expand(-1, n_copies, -1, -1), logits], dim=2)

    # ------------------------------------------------------ multi-block pipelining (approximate)
    def _pipelined(self) -> Iterator[StepEvent | BlockEvent]:
        """D2F-style pipelining: block k+1 joins the pass once the newest active block has
        `block_add_threshold` of its positions committed, before block k is final.

        Every pass runs the active blocks [ws, we) together under the block-causal mask (a block
        sees the current, partly masked state of the blocks before it), commits the oldest
        block's top-1 plus every position at or above `threshold` in any active block, and
        finishes the oldest block (fused commit pass, events, EOS) as soon as it has no mask.
        Approximate: a later block is denoised against a context that may still change. Rows of
        one batch share the schedule (when a block is added, when the window advances)."""
        a = self.args
        B, end = a.block_length, self.c + self.n_windows * a.block_length
        w, n_active, commit_from, step = 0, 1, 0, 0
        while self.rows and w < self.n_windows:
            ws = self.c + w * B
            we = min(end, ws + n_active * B)
            logits = self._forward(ws, we, commit_from)
            commit_from = ws
            masked = self.masked[:, ws:we]
            conf, x0 = self._propose(logits, masked)
            select = conf >= a.threshold
            select[:, :B] |= confidence_ranks(conf[:, :B]) == 0  # the oldest block always commits its top-1
            select = self._apply(select & masked, x0, ws, we)
            if self.step_events:
                for j in range(0, we - ws, B):
                    yield from self._step_events(w + j // B, step, ws + j, select[:, j:j + B], conf[:, j:j + B],
                                                 x0[:, j:j + B])
            step += 1
            # The oldest blocks that are now complete leave the window (each one's clean keys are
            # written by the next pass, as in the one-block engine).
            while n_active and self.rows and not bool(self.masked[:, ws:ws + B].any()):
                yield from self._finish_window(w, ws)
                w, n_active, step = w + 1, n_active - 1, 0  # its keys: written by the next pass (from commit_from)
                ws += B
                if w >= self.n_windows:
                    return
            if not self.rows:
                return
            n_active = max(n_active, 1)
            newest = self.masked[:, ws + (n_active - 1) * B:ws + n_active * B]
            done_frac = 1.0 - float(newest.float().mean(1).max())
            if n_active < a.max_active_blocks and w + n_active < self.n_windows and done_frac >= a.block_add_threshold:
                n_active += 1

    def _step_events(self, w: int, step: int, ws: int, select, conf, x0) -> Iterator[StepEvent]:
        sel, cf, tok = select.tolist(), conf.tolist(), x0.tolist()
        for b, row in enumerate(self.rows):
            pos = [j for j, s in enumerate(sel[b]) if s]
            if pos:
                yield StepEvent(row, step, w, [ws + j - self.gen_start[row] for j in pos],
                                [tok[b][j] for j in pos], [float(cf[b][j]) for j in pos])

    def _finish_window(self, w: int, ws: int) -> Iterator[BlockEvent]:
        a = self.args
        we = ws + a.block_length
        window = self.x[:, ws:we].tolist()
        keep: list[int] = []
        for b, row in enumerate(self.rows):
            lo, hi = max(ws, self.gen_start[row]), min(we, self.gen_end[row])
            new = window[b][lo - ws:hi - ws] if hi > lo else []
            reason = None
            if a.eos_id is not None and a.eos_id in new:
                new = new[:new.index(a.eos_id) + 1]
                reason = "stop"
            elif hi >= self.gen_end[row]:
                reason = "length"
            elif row in self._cancelled:
                reason = "cancelled"
            self._tokens[row].extend(new)
            if reason:
                self._reasons[row] = reason
            else:
                keep.append(b)
            if new or reason:
                yield BlockEvent(row, w, lo - self.gen_start[row], new, reason is not None, reason)
        if len(keep) < len(self.rows):
            self._select_rows(keep)

    def _select_rows(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.x.device)
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            return
        for name in ("x", "pos", "key_valid", "masked"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        if self.lead_logits is not None:
            self.lead_logits = self.lead_logits.index_select(0, idx)
        self.cache.select_rows(idx)


def generate(model: torch.nn.Module, prompts: str | list[str] | list[list[int]], *,
             steps: int | None = MODEL_DEFAULT, gen_length: int = MODEL_DEFAULT, max_new_tokens: int | None = None,
             block_length: int = MODEL_DEFAULT, temperature: float = MODEL_DEFAULT, remasking: str = MODEL_DEFAULT,
             threshold: float | None = MODEL_DEFAULT, shift: bool = MODEL_DEFAULT, eos_id: int | None = None,
             mask_id: int | None = None, seed: int | None = MODEL_DEFAULT,
             on_event: Callable[[StepEvent | BlockEvent], None] | None = None,
             step_events: bool = False, confidence_dtype: torch.dtype = torch.float64,
             runner: str = "auto", max_active_blocks: int = MODEL_DEFAULT, block_add_threshold: float = MODEL_DEFAULT,
             speculative: bool = MODEL_DEFAULT) -> GenerateResult:
    """Decode every prompt with block diffusion; see `Decoding` for the rules.

    `prompts` are token-id lists, or text (a str or a list of str) encoded with `model.tokenizer`;
    for text, `eos_id` defaults to the tokenizer's and `result.texts` holds each row's decoded text.
    A decoder setting left out comes from the checkpoint's generation_config.json, as on the
    command line (engine/settings.py: block length, shift, remasking, ... are the model's, else
    `DEFAULTS`). `gen_length` (alias `max_new_tokens`) tokens are generated in `steps` steps
    (default gen_length: one token per forward pass). max_active_blocks > 1 turns on multi-block
    pipelining (approximate; needs a threshold); speculative=True decodes the tokens of one token
    per pass in fewer passes (greedy)."""
    if max_new_tokens is not None:
        if gen_length is not MODEL_DEFAULT and gen_length != max_new_tokens:
            raise ValueError(f"gen_length={gen_length} and max_new_tokens={max_new_tokens} name the same setting; "
                             "give one")
        gen_length = max_new_tokens
    named = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
                 remasking=remasking, threshold=threshold, shift=shift, seed=seed, max_active_blocks=max_active_blocks,
                 block_add_threshold=block_add_threshold, speculative=speculative)
    kw = resolve({k: v for k, v in named.items() if v is not MODEL_DEFAULT}, model)
    tok = None
    if isinstance(prompts, str) or (prompts and all(isinstance(p, str) for p in prompts)):
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("text prompts need the model's tokenizer and this model has none; pass token-id lists")
        prompts = [tok.encode(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        eos_id = tok.eos_id if eos_id is None else eos_id
    elif any(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be all text or all token-id lists, not a mix")
    dec = Decoding(model, prompts, **kw, eos_id=eos_id, mask_id=mask_id, step_events=step_events,
                   confidence_dtype=confidence_dtype, runner=runner)
    for event in dec:
        if on_event is not None:
            on_event(event)
    assert dec.result is not None
    if tok is not None:
        dec.result.texts = [tok.decode([t for t in ids if t != eos_id]) for ids in dec.result.tokens]
    return dec.result
