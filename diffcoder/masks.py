"""Attention masks as pure functions (True = the query may attend to the key).

The block-causal rule is the one thing training and decoding must agree on: with block
size B and blocks aligned to absolute position 0, a query in block b sees every key in
blocks 0..b (bidirectional inside its own block, causal across blocks). B = 1 is the
ordinary causal mask; B >= sequence length is full attention.
"""
from __future__ import annotations

import torch


def block_causal_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., q] x [..., k] positions -> [..., q, k] mask: key block <= query block."""
    return (k_pos.unsqueeze(-2) // block_size) <= (q_pos.unsqueeze(-1) // block_size)


def causal_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)


def block_causal_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[seq_len, seq_len] block-causal mask for one unpadded sequence starting at position 0."""
    pos = torch.arange(seq_len, device=device)
    return block_causal_allowed(pos, pos, block_size)


def decode_mask(q_cols: torch.Tensor, k_cols: torch.Tensor, key_valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mask for a batch whose rows are left-padded by multiples of the block size.

    q_cols [q], k_cols [k]: column indices (shared by all rows); key_valid [b, k]: whether a
    column holds a real token of that row (not left padding, not past the row's end). Because
    every pad is a multiple of B, block membership by column equals block membership by
    position. Each query may always see itself, so a pad query never has an empty row
    (an all-masked softmax would give NaN, which would then leak through 0 * NaN).
    """
    allowed = block_causal_allowed(q_cols, k_cols, block_size).unsqueeze(0) & key_valid.unsqueeze(1)
    return allowed | (k_cols.unsqueeze(0) == q_cols.unsqueeze(1)).unsqueeze(0)


def block_copies_mask(prefix_valid: torch.Tensor, block_valid: torch.Tensor, n_copies: int) -> torch.Tensor:
    """[b, n*B, P + n*B] mask for n copies of one block side by side after a prefix of P columns
    (speculative decoding): every copy sees the prefix's valid columns and its own valid columns,
    never another copy. prefix_valid [b, P], block_valid [b, B]. Each query may see itself (as in
    `decode_mask`: a pad query never has an empty row)."""
    B = block_valid.shape[1]
    copy = torch.arange(n_copies * B, device=block_valid.device) // B
    own = (copy[:, None] == copy[None, :]) & block_valid.repeat(1, n_copies)[:, None, :]
    own |= torch.eye(n_copies * B, dtype=torch.bool, device=block_valid.device)
    return torch.cat([prefix_valid[:, None, :].expand(-1, n_copies * B, -1), own], dim=-1)


