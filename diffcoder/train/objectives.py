"""Training losses: next-token (AR) and vectorised block diffusion.

Both return the *sum* of per-token losses over the batch; the trainer divides by the number
of eligible tokens of the whole global batch (all micro-batches, all ranks), so the value is
the same however the batch is split. "Eligible" = positions that can carry loss: every
position (pretraining) or the assistant tokens (SFT); AR and shift mode drop position 0,
which has no predecessor.

Block diffusion, vectorised (one forward gives every block its loss): the input is
[x_t ; x_0] (noisy copies, clean copy) with the attention of `NoisyCopies.attention`: a noisy
block sees itself and the clean blocks before it, a clean block the clean blocks up to
itself, and nothing sees a noisy block but itself. So a block with no masked position (an SFT
prompt, padding) needs no noisy copy: each row carries noisy copies of its masked blocks only, at
their own positions (rows with fewer get spare copies that nothing reads), which is the same loss
in fewer positions. Loss = sum over masked positions i of w(block(i)) * CE(logits_i, x0_i), read
from the noisy copies. With `shift`, position i is predicted by the output at i - 1; for the
first position of a block that output is the clean copy's token i - 1 (which sees clean blocks
<= block(i) - 1 only), exactly the "lead" logits a shift decoder gets by feeding the last
committed token in front of the block. The vocabulary projection runs only at the positions that
carry loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def eligible_positions(shape: tuple[int, int], loss_mask: torch.Tensor | None, drop_first: bool) -> torch.Tensor:
    """[b, L] bool: where a loss may be taken."""
    elig = torch.ones(shape, dtype=torch.bool) if loss_mask is None else loss_mask.to("cpu", torch.bool).clone()
    if drop_first:
        elig[:, 0] = False
    return elig


@dataclass
class NoisyCopies:
    """Which blocks of each row get a noisy copy in the pass: [b, K] block indices (the row's
    blocks holding a masked position, in order, then spares) and slot_of [b, L / B] (a block's
    copy slot; meaningful for masked blocks only)."""
    blocks: torch.Tensor
    slot_of: torch.Tensor

    @staticmethod
    def of(noise_mask: torch.Tensor, block_size: int, every_block: bool = False) -> NoisyCopies:
        """`every_block`: a copy of every block, masked or not (the same loss; a baseline)."""
        b, length = noise_mask.shape
        masked = noise_mask.view(b, length // block_size, block_size).any(-1)
        k = masked.shape[1] if every_block else max(1, int(masked.sum(1).max()))
        # Masked blocks first, in order (a stable sort); the spares are unmasked blocks.
        blocks = torch.argsort((~masked).to(torch.int8), dim=1, stable=True)[:, :k]
        slot_of = torch.zeros_like(masked, dtype=torch.long)
        slot_of.scatter_(1, blocks, torch.arange(k, device=noise_mask.device).expand(b, k))
        return NoisyCopies(blocks, slot_of)

    def attention(self, length: int, block_size: int) -> torch.Tensor:
        """[b, KB + L, KB + L] bool over [noisy copies; clean copy]: a copy sees itself and the
        clean blocks before its block; a clean block sees the clean blocks up to itself."""
        b, k = self.blocks.shape
        dev = self.blocks.device
        noisy_blk = self.blocks.repeat_interleave(block_size, dim=1)  # [b, KB]
        slot = torch.arange(k, device=dev).repeat_interleave(block_size)  # [KB]
        clean_blk = torch.arange(length, device=dev) // block_size  # [L]
        top = torch.cat([(slot[:, None] == slot[None, :]).expand(b, -1, -1),
                         clean_blk[None, None, :] < noisy_blk[:, :, None]], dim=2)
        bottom = torch.cat([torch.zeros(length, k * block_size, dtype=torch.bool, device=dev),
                            clean_blk[None, :] <= clean_blk[:, None]], dim=1)
        return torch.cat([top, bottom.expand(b, -1, -1)], dim=1)

    def source(self, rows: torch.Tensor, cols: torch.Tensor, length: int, block_size: int,
               shift: bool) -> torch.Tensor:
        """Index into the pass's outputs whose logits predict token (row, col) (a masked one)."""
        k = self.blocks.shape[1]
        at = self.slot_of[rows, cols // block_size] * block_size + cols % block_size
        if not shift:
            return at
        # Column i's logits come from i - 1: in the block's copy, or at a block's first column
        # the clean copy's previous token.
        return torch.where(cols % block_size == 0, k * block_size + cols - 1, at - 1)


def _weighted_ce(model: nn.Module, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    logits = model.lm_head(h[rows, cols]).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * weights).sum() if weights is not None else ce.sum()


def ar_loss_sum(model: nn.Module, tokens: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE: the output at i - 1 predicts token i, for eligible i (i >= 1)."""
    h = model.hidden_states(tokens, attn_mask="causal")
    rows, cols = eligible.to(tokens.device).nonzero(as_tuple=True)
    return _weighted_ce(model, h, rows, cols - 1, tokens[rows, cols], None)


def block_diffusion_loss_sum(model: nn.Module, tokens: torch.Tensor, noise_mask: torch.Tensor,
                             weight: torch.Tensor, mask_id: int, block_size: int,
                             shift: bool = False, every_block: bool = False) -> torch.Tensor:
    """Weighted CE summed over the masked positions of every block, in one forward (`every_block`:
    see `NoisyCopies.of`)."""
    b, length = tokens.shape
    if length % block_size:
        raise ValueError(f"sequence length {length} is not a multiple of the block size {block_size}")
    dev = tokens.device
    noise_mask = noise_mask.to(dev)
    copies = NoisyCopies.of(noise_mask, block_size, every_block)
    at = (copies.blocks.repeat_interleave(block_size, dim=1)
          * block_size + torch.arange(block_size, device=dev).repeat(copies.blocks.shape[1]))  # [b, KB]
    noisy = torch.where(noise_mask, torch.full_like(tokens, mask_id), tokens).gather(1, at)
    inp = torch.cat([noisy, tokens], dim=1)
    pos = torch.cat([at, torch.arange(length, device=dev).expand(b, length)], dim=1)
    h = model.hidden_states(inp, pos, attn_mask=copies.attention(length, block_size))
    rows, cols = noise_mask.nonzero(as_tuple=True)
    src = copies.source(rows, cols, length, block_size, shift)
    return _weighted_ce(model, h, rows, src, tokens[rows, cols], weight.to(dev)[rows, cols])


class LossModule(nn.Module):
    """Wraps the model so DDP/FSDP see one forward that returns the loss sum."""

    def __init__(self, model: nn.Module, objective: str, mask_id: int | None, block_size: int,
                 shift: bool) -> None:
        super().__init__()
        self.model = model
        self.objective, self.mask_id, self.block_size, self.shift = objective, mask_id, block_size, shift

    def forward(self, tokens: torch.Tensor, eligible: torch.Tensor, noise_mask: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.objective == "ar":
            return ar_loss_sum(self.model, tokens, eligible)
        assert noise_mask is not None and weight is not None and self.mask_id is not None
        return block_diffusion_loss_sum(self.model, tokens, noise_mask, weight, self.mask_id, self.block_size,
                                        self.shift)
