"""Training losses: next-token (AR) and vectorised block diffusion.

Both return the *sum* of per-token losses over the batch; the trainer divides by the number
of eligible tokens of the whole global batch (all micro-batches, all ranks), so the value is
the same however the batch is split. "Eligible" = positions that can carry loss: every
position (pretraining) or the assistant tokens (SFT); AR and shift mode drop position 0,
which has no predecessor.

Block diffusion, vectorised (one forward gives every block its loss): the input is
[x_t ; x_0] (noisy copy, clean copy) of length 2L at positions [0..L-1, 0..L-1] with
`masks.block_diffusion_training_mask`. Loss = sum over masked positions i of
w(block(i)) * CE(logits_i, x0_i), read from the noisy half. With `shift`, position i is
predicted by the output at i - 1; for the first position of a block that output is the clean
copy's token i - 1 (which sees clean blocks <= block(i) - 1 only), exactly the "lead" logits
a shift decoder gets by feeding the last committed token in front of the block.
The vocabulary projection runs only at the positions that carry loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcoder.masks import block_diffusion_training_mask


def eligible_positions(shape: tuple[int, int], loss_mask: torch.Tensor | None, drop_first: bool) -> torch.Tensor:
    """[b, L] bool: where a loss may be taken."""
    elig = torch.ones(shape, dtype=torch.bool) if loss_mask is None else loss_mask.to("cpu", torch.bool).clone()
    if drop_first:
        elig[:, 0] = False
    return elig


def shift_source_index(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[L] index into the 2L outputs whose logits predict token i in shift mode (i >= 1)."""
    i = torch.arange(seq_len, device=device)
    src = i - 1
    first = (i % block_size == 0) & (i > 0)
    return torch.where(first, seq_len + i - 1, src)  # block start: the clean copy's previous token


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
                             shift: bool = False) -> torch.Tensor:
    """Weighted CE summed over the masked positions of every block, in one forward."""
    b, length = tokens.shape
    dev = tokens.device
    noise_mask = noise_mask.to(dev)
    noisy = torch.where(noise_mask, torch.full_like(tokens, mask_id), tokens)
    inp = torch.cat([noisy, tokens], dim=1)
    pos = torch.arange(length, device=dev).repeat(2).expand(b, 2 * length)
    attn = block_diffusion_training_mask(length, block_size, device=dev).unsqueeze(0)
    h = model.hidden_states(inp, pos, attn_mask=attn)
    rows, cols = noise_mask.nonzero(as_tuple=True)
    src = shift_source_index(length, block_size, dev)[cols] if shift else cols
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
