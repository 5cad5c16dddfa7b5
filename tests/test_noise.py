"""Block-wise corruption: statistics, warmup ramp and weights, purity (pure functions of a generator)."""
from __future__ import annotations

import pytest
import torch

from diffcoder.train.objectives import NoisyCopies
from diffcoder.train.noise import in_warmup, noise_generator, sample_block_noise, u_max_at

B = 4


def draw(n_rows: int = 2000, length: int = 64, **kw) -> object:
    return sample_block_noise((n_rows, length), B, kw.pop("u_max", 1.0), torch.Generator().manual_seed(0), **kw)


def test_clipped_every_block_masked_and_rate_at_least_1_over_b() -> None:
    nz = draw()
    per_block = nz.mask.reshape(2000, -1, B)
    assert per_block.any(-1).all(), "with clipping + fallback every block must carry >= 1 mask"
    assert (nz.u_blk >= 1 / B).all() and (nz.u_blk <= 1).all()
    assert nz.mask.float().mean() >= 1 / B
    # Expected rate: E[u_blk + P(no mask | u_blk) / B] with u_blk = max(u, 1/B), u ~ U(0, 1)
    # (the fallback adds one of B positions to the blocks that drew none); integrate numerically.
    u = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    ub = u.clamp(min=1 / B)
    expected = (ub + (1 - ub) ** B / B).mean().item()
    assert nz.mask.float().mean().item() == pytest.approx(expected, abs=0.01)
    # Weight 1/u_blk is constant inside a block and at most B.
    assert torch.allclose(nz.weight.reshape(2000, -1, B), (1 / nz.u_blk).unsqueeze(-1).expand(-1, -1, B))
    assert nz.weight.max() <= B + 1e-6


def test_clipped_even_at_tiny_u_max_has_masks() -> None:
    nz = draw(u_max=1e-3)
    assert nz.mask.reshape(2000, -1, B).any(-1).all()
    assert torch.allclose(nz.u_blk, torch.full_like(nz.u_blk, 1 / B))  # clip dominates early warmup


def test_unclipped_empty_block_fraction_is_one_over_b_plus_one() -> None:
    nz = draw(clip=False)
    frac = nz.zero_before_fallback.float().mean().item()
    assert frac == pytest.approx(1 / (B + 1), abs=0.01)
    # The fallback still guarantees a mask per block unless switched off too.
    assert nz.mask.reshape(2000, -1, B).any(-1).all()
    naive = draw(clip=False, force_mask=False)
    empty = (~naive.mask.reshape(2000, -1, B).any(-1)).float().mean().item()
    assert empty == pytest.approx(1 / (B + 1), abs=0.01)
    assert naive.mask.float().mean().item() == pytest.approx(0.5, abs=0.01)  # E[u] for u ~ U(0, 1)


def test_fallback_is_uniform_over_eligible_positions() -> None:
    # Only positions 1 and 3 of each block are eligible; u tiny without clip -> fallback nearly always.
    elig = torch.zeros(4000, B, dtype=torch.bool)
    elig[:, 1] = elig[:, 3] = True
    nz = sample_block_noise((4000, B), B, 1e-6, torch.Generator().manual_seed(1), clip=False, eligible=elig)
    assert not nz.mask[:, [0, 2]].any()
    assert (nz.mask.sum(-1) == 1).all()
    share = nz.mask[:, 1].float().mean().item()
    assert share == pytest.approx(0.5, abs=0.03)


def test_blocks_without_eligible_positions_stay_clean() -> None:
    elig = torch.zeros(3, 8, dtype=torch.bool)
    elig[:, 4:] = True  # first block is prompt: never masked
    nz = sample_block_noise((3, 8), B, 1.0, torch.Generator().manual_seed(2), eligible=elig)
    assert not nz.mask[:, :4].any() and nz.mask[:, 4:].any(-1).all()
    assert not nz.eligible_blocks[:, 0].any()


def test_warmup_ramp_and_weights() -> None:
    assert u_max_at(0, 100, 1e-3) == pytest.approx(1e-3)
    assert u_max_at(50, 100, 1e-3) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert u_max_at(100, 100, 1e-3) == 1.0 and u_max_at(500, 100) == 1.0
    assert u_max_at(0, 100, warmup=False) == 1.0 and u_max_at(0, 0) == 1.0
    ramp = [u_max_at(s, 10, 0.01) for s in range(12)]
    assert all(a < b for a, b in zip(ramp[:10], ramp[1:11])), "strictly increasing during warmup"
    assert in_warmup(9, 10) and not in_warmup(10, 10) and not in_warmup(0, 10, warmup=False)
    # During warmup t ~ U(0, u_max): the unclipped masking rate never exceeds u_max; weight is 1.
    nz = draw(u_max=0.3, clip=False, weighted=False, force_mask=False)
    assert nz.u_blk.max() <= 0.3 and torch.all(nz.weight == 1)
    assert nz.mask.float().mean().item() == pytest.approx(0.15, abs=0.01)


def test_pure_function_of_generator_and_key() -> None:
    a = sample_block_noise((4, 16), B, 0.7, noise_generator(3, 10, 1))
    b = sample_block_noise((4, 16), B, 0.7, noise_generator(3, 10, 1))
    c = sample_block_noise((4, 16), B, 0.7, noise_generator(3, 11, 1))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.mask, c.mask)


def test_length_must_be_multiple_of_block() -> None:
    with pytest.raises(ValueError, match="multiple of the block size"):
        sample_block_noise((1, 10), B, 1.0, torch.Generator())


def test_training_attention_matches_rule_loop() -> None:
    """[noisy copies; clean copy]: a copy sees itself and the clean blocks before its block; a clean
    block sees the clean blocks up to itself. Only blocks with a masked position get a copy."""
    L = 12
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, [1, 9]] = True  # blocks 0 and 2
    mask[1, 5] = True  # block 1 (and a spare copy)
    copies = NoisyCopies.of(mask, B)
    assert copies.blocks[0].tolist() == [0, 2] and copies.blocks[1, 0].item() == 1
    m = copies.attention(L, B)
    n = 2 * B  # noisy positions per row
    for r in range(2):
        for q in range(n + L):
            for k in range(n + L):
                qn, kn = q < n, k < n
                qb = copies.blocks[r, q // B].item() if qn else (q - n) // B
                kb = copies.blocks[r, k // B].item() if kn else (k - n) // B
                if qn and kn:
                    want = q // B == k // B
                elif qn:
                    want = kb < qb
                elif kn:
                    want = False
                else:
                    want = kb <= qb
                assert bool(m[r, q, k]) == want, (r, q, k)
