"""Block-wise corruption for block-diffusion training, as pure functions.

Everything here is a function of (shapes, block size, schedule values, a torch.Generator):
no global RNG, no module state, so tests can compare it with slow loops and a resumed run
draws exactly the noise an uninterrupted run would.

Conventions (see docs/training.md, "Noise"):
* Per block, t ~ U(0, u_max). We read the recipe's u(t) = 1 - t as the *keep* schedule
  alpha(t) = 1 - t of masked diffusion, so the masking probability of the block is
  u = 1 - alpha(t) = t. This is the reading under which the warmup makes sense: with u_max
  near u_init the corruption is light (close to the AR task the checkpoint knows) and it
  grows to the full U(0, 1) range; the 1/u weight, which would explode at tiny u, is dropped
  (weight 1) during warmup. Marginally u ~ U(0, u_max) either way.
* Clipped: u_blk = min(1, max(u, 1/B)): the expected number of masks per block is >= 1.
* Each eligible token of the block is masked independently with probability u_blk; if none
  got masked (and the block has an eligible token), one eligible position chosen uniformly is
  force-masked. `zero_before_fallback` records which blocks needed that.
* `force_mask=False` (ablation flag --no-force-mask) skips the fallback: the naive scheme.
* Weight per block: 1/u_blk after warmup, 1 during warmup (or with weighting off).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockNoise:
    """One draw of block-wise corruption for a [batch, length] batch."""

    mask: torch.Tensor  # [b, L] bool: True where the token is replaced by the mask token
    weight: torch.Tensor  # [b, L] float32: the loss weight of the token's block (1/u_blk or 1)
    u_blk: torch.Tensor  # [b, nblocks] float32: masking probability used per block
    zero_before_fallback: torch.Tensor  # [b, nblocks] bool: eligible block with no mask before the fallback
    # (with force_mask=False the fallback never runs, so these blocks stay empty and give no loss)
    eligible_blocks: torch.Tensor  # [b, nblocks] bool: block has at least one eligible position


def u_max_at(step: int, warmup_steps: int, u_init: float = 1e-3, warmup: bool = True) -> float:
    """Upper end of the corruption range at optimizer step `step` (0-based).

    Rises linearly from u_init (step 0) to 1 (step warmup_steps) and stays at 1.
    """
    if not warmup or warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return u_init + (1.0 - u_init) * step / warmup_steps


def in_warmup(step: int, warmup_steps: int, warmup: bool = True) -> bool:
    """Whether the corruption warmup (weight 1) is active at this step."""
    return warmup and warmup_steps > 0 and step < warmup_steps


def sample_block_noise(shape: tuple[int, int], block_size: int, u_max: float, generator: torch.Generator, *,
                       clip: bool = True, weighted: bool = True, force_mask: bool = True,
                       eligible: torch.Tensor | None = None) -> BlockNoise:
    """Draw block-wise masks for a [b, L] batch (L a multiple of block_size).

    `eligible` [b, L] bool marks positions that may be masked (SFT: assistant tokens only;
    shift mode: not position 0); default all. Draw order is fixed (t, then token uniforms,
    then fallback choice), all on CPU, so the result depends only on the generator state.
    """
    b, length = shape
    if length % block_size:
        raise ValueError(f"sequence length {length} is not a multiple of the block size {block_size}")
    if not 0.0 < u_max <= 1.0:
        raise ValueError(f"u_max must be in (0, 1], got {u_max}")
    nb = length // block_size
    t = torch.rand((b, nb), generator=generator) * u_max
    u = t  # masking probability 1 - alpha(t) with alpha(t) = 1 - t (see module docstring)
    u_blk = torch.clamp(u, min=1.0 / block_size, max=1.0) if clip else u
    token_u = torch.rand((b, nb, block_size), generator=generator)
    fallback_key = torch.rand((b, nb, block_size), generator=generator)
    elig = (torch.ones((b, nb, block_size), dtype=torch.bool) if eligible is None
            else eligible.detach().to("cpu", torch.bool).reshape(b, nb, block_size))
    mask = (token_u < u_blk.unsqueeze(-1)) & elig
    eligible_blocks = elig.any(-1)
    zero = eligible_blocks & ~mask.any(-1)
    # Fallback: force-mask the eligible position with the largest random key (uniform among eligible).
    keys = torch.where(elig, fallback_key, torch.full_like(fallback_key, -1.0))
    pick = torch.nn.functional.one_hot(keys.argmax(-1), block_size).bool()
    if force_mask:
        mask = mask | (pick & zero.unsqueeze(-1))
    if weighted:
        w_blk = 1.0 / u_blk.clamp(min=torch.finfo(torch.float32).tiny)
    else:
        w_blk = torch.ones_like(u_blk)
    weight = w_blk.unsqueeze(-1).expand(b, nb, block_size).reshape(b, length).contiguous()
    return BlockNoise(mask=mask.reshape(b, length), weight=weight.float(), u_blk=u_blk.float(),
                      zero_before_fallback=zero, eligible_blocks=eligible_blocks)


def noise_generator(seed: int, step: int, micro: int, stream: int = 0) -> torch.Generator:
    """A CPU generator keyed by (seed, step, micro-batch, stream): counter-based randomness.

    The whole *global* micro-batch is drawn from it and each rank takes its rows, so the noise
    of a sequence does not depend on the world size or on where a run was resumed.
    """
    # A fixed odd-multiplier mix keeps distinct keys apart without Python's salted hash().
    key = (seed * 1_000_003 + step) * 1_000_033 + micro
    key = key * 7 + stream
    return torch.Generator().manual_seed(key % (2**63 - 1))
