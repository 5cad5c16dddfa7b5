"""The release's rules for one denoising step: what each masked position proposes, and which of
them a step commits. Pure functions of tensors (no state), so a compiled runner can trace them
into the model's step (docs/decoding.md states the rules and where we differ on purpose)."""
from __future__ import annotations

import torch

from .. import kernels


def confidence_ranks(conf: torch.Tensor) -> torch.Tensor:
    """Rank of each position by confidence within its row (0 = most confident; ties: leftmost first)."""
    order = torch.argsort(conf, dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))


def propose(logits: torch.Tensor, masked: torch.Tensor, *, mask_id: int, temperature: float = 0.0,
            remasking: str = "low_confidence", dtype: torch.dtype = torch.float64,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token) at the block's masked positions, by the release's rules; elsewhere
    (decoded already: no rule reads them) confidence -inf and token `mask_id`. Pure (no state):
    compiled runners trace it into the step."""
    scored = remasking != "random"  # confidence = the chosen token's softmax probability
    if (temperature == 0 and scored and dtype == torch.float64
            and masked.shape == logits.shape[:-1]):
        native = kernels.confidence_ops(logits)
        if native is not None:  # the same rule in one pass over the masked rows' logits (kernels/confidence.cpp)
            return native.greedy_confidence(logits, mask_id, masked)
    scores = logits.to(dtype)  # float64 by default, as the release
    if scored:
        log_z = torch.logsumexp(scores, dim=-1, keepdim=True)  # over the full vocabulary, mask included
    scores[..., mask_id] = float("-inf")  # never predict the mask token itself
    if temperature > 0:
        # Gumbel-max in float64, as the release: argmax(exp(l) / (-log U)^T)
        g = scores.to(torch.float64)
        u = torch.rand(g.shape, generator=generator, device=g.device, dtype=torch.float64)
        x0 = (g.exp() / (-torch.log(u)) ** temperature).argmax(-1)
    else:
        x0 = scores.argmax(-1)
    if scored:
        conf = (scores.gather(-1, x0.unsqueeze(-1)) - log_z).exp().squeeze(-1)
    else:
        conf = torch.rand(masked.shape, generator=generator, device=masked.device, dtype=torch.float64)
    return torch.where(masked, conf, torch.full_like(conf, float("-inf"))), torch.where(masked, x0, mask_id)


def commit_rule(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor | None,
                threshold: float | None, left_to_right: bool = False) -> torch.Tensor:
    """Which masked positions to commit: the k most confident per row (the step's allotment), or
    with a threshold the top-1 plus every position at or above it (the release's rules).
    `left_to_right` ranks by place instead: the k leftmost masked positions, or with a threshold
    the leftmost plus the unbroken run of masked positions after it at or above the threshold."""
    if not left_to_right:
        ranks = confidence_ranks(conf)
        select = (ranks < k) if k is not None else (ranks == 0) | (conf >= threshold)
        return select & masked
    ranks = torch.cumsum(masked.long(), dim=-1) - 1  # 0 = leftmost masked position of the row
    if k is not None:
        return (ranks < k) & masked
    ok = (conf >= threshold) | (ranks == 0) | ~masked
    return torch.cumprod(ok.long(), dim=-1).bool() & masked


def greedy_choice(logits: torch.Tensor, masked: torch.Tensor, k: torch.Tensor | None, window: torch.Tensor, *,
                  mask_id: int, threshold: float | None, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One greedy low-confidence step after the pass: (select, confidence, token, the window's new
    tokens, its new mask). What a compiled runner fuses into the model's step, so that one
    compiled call replaces the pass and the ~30 small ops of choosing and committing."""
    conf, x0 = propose(logits, masked, mask_id=mask_id, dtype=dtype)
    select = commit_rule(conf, masked, k, threshold)
    return select, conf, x0, *committed_window(select, x0, window, masked)


def committed_window(select: torch.Tensor, x0: torch.Tensor, window: torch.Tensor,
                     masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The window's tokens and mask once the selected positions are committed."""
    return torch.where(select, x0, window), masked & ~select


def block_schedule(masked: int, steps_per_block: int) -> list[int]:
    """Tokens committed at each (non-skipped) step of a block: the release's allotment."""
    base, extra = divmod(masked, steps_per_block)
    # `extra` steps of base + 1, then the rest of base each (none when base is 0): at most
    # `masked` entries, whatever steps_per_block is.
    return [base + 1] * extra + [base] * ((steps_per_block - extra) if base else 0)
