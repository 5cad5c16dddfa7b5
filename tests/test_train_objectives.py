"""Vectorised block-diffusion loss == a slow per-block loop; AR loss == a plain shifted CE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcoder.config import ModelConfig
from diffcoder.model import DiffCoderLM
from diffcoder.tokenizer import MASK_TOKEN, SPECIAL_TOKENS
from diffcoder.train.noise import sample_block_noise
from diffcoder.train.objectives import ar_loss_sum, block_diffusion_loss_sum, eligible_positions

# The mask id of our tokenizer layout (Seed-Coder's), looked up by name.
MASK_ID, B, VOCAB = SPECIAL_TOKENS.index(MASK_TOKEN), 4, 97


@pytest.fixture(scope="module")
def model() -> DiffCoderLM:
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK_ID)
    return DiffCoderLM(cfg).init_weights(0, std=0.2).double()


def per_block_oracle(model: DiffCoderLM, x0: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                     shift: bool) -> torch.Tensor:
    """Corrupt one block at a time behind a clean prefix and run the model on prefix + block."""
    total = torch.zeros((), dtype=torch.float64)
    b, length = x0.shape
    for r in range(b):
        for blk in range(length // B):
            lo, hi = blk * B, (blk + 1) * B
            if not mask[r, lo:hi].any():
                continue
            noisy = torch.where(mask[r, lo:hi], torch.tensor(MASK_ID), x0[r, lo:hi])
            inp = torch.cat([x0[r, :lo], noisy]).unsqueeze(0)
            logits = model(inp, attn_mask=("block_causal", B))[0]
            for i in range(lo, hi):
                if mask[r, i]:
                    src = i - 1 if shift else i  # shift: i - 1 (for i == lo the clean previous token)
                    ce = F.cross_entropy(logits[src].unsqueeze(0), x0[r, i].unsqueeze(0))
                    total = total + weight[r, i] * ce
    return total


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("clip", [True, False])
def test_vectorised_equals_per_block_loop(model: DiffCoderLM, shift: bool, clip: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randint(7, VOCAB, (3, 16), generator=gen)
    elig = eligible_positions((3, 16), None, drop_first=shift)
    nz = sample_block_noise((3, 16), B, 1.0, gen, clip=clip, eligible=elig)
    fast = block_diffusion_loss_sum(model, x0, nz.mask, nz.weight.double(), MASK_ID, B, shift=shift)
    slow = per_block_oracle(model, x0, nz.mask, nz.weight.double(), shift)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)  # RMSNorm computes in float32
    assert nz.mask.sum() > 0


def test_vectorised_equals_loop_with_prompt_loss_mask(model: DiffCoderLM) -> None:
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(7, VOCAB, (2, 20), generator=gen)
    loss_mask = torch.zeros(2, 20, dtype=torch.bool)
    loss_mask[0, 6:15] = True  # the answer starts mid-block: the prompt part is never masked
    loss_mask[1, 9:] = True
    elig = eligible_positions((2, 20), loss_mask, drop_first=False)
    nz = sample_block_noise((2, 20), B, 0.6, gen, eligible=elig)
    assert not (nz.mask & ~loss_mask).any()
    fast = block_diffusion_loss_sum(model, x0, nz.mask, nz.weight.double(), MASK_ID, B)
    slow = per_block_oracle(model, x0, nz.mask, nz.weight.double(), False)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)  # RMSNorm computes in float32


def test_prompt_blocks_get_no_noisy_copy_and_loss_and_gradients_equal_the_loop(model: DiffCoderLM) -> None:
    """With shift and a prompt that is never masked, the pass carries noisy copies of the masked
    blocks only (rows with fewer get spares), and the loss and every gradient equal the loop's."""
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randint(7, VOCAB, (2, 24), generator=gen)
    loss_mask = torch.zeros(2, 24, dtype=torch.bool)
    loss_mask[0, 10:] = True
    loss_mask[1, 17:21] = True
    elig = eligible_positions((2, 24), loss_mask, drop_first=True)
    nz = sample_block_noise((2, 24), B, 1.0, gen, eligible=elig)
    lengths = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    try:
        fast = block_diffusion_loss_sum(model, x0, nz.mask, nz.weight.double(), MASK_ID, B, shift=True)
    finally:
        hook.remove()
    masked_blocks = nz.mask.view(2, -1, B).any(-1).sum(1).max().item()
    assert lengths == [24 + masked_blocks * B] and masked_blocks < 24 // B
    fast_grads = torch.autograd.grad(fast, list(model.parameters()), allow_unused=True)
    slow = per_block_oracle(model, x0, nz.mask, nz.weight.double(), True)
    slow_grads = torch.autograd.grad(slow, list(model.parameters()), allow_unused=True)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
    every = block_diffusion_loss_sum(model, x0, nz.mask, nz.weight.double(), MASK_ID, B, shift=True, every_block=True)
    assert every.item() == pytest.approx(fast.item(), rel=1e-9)
    for f, s in zip(fast_grads, slow_grads):
        if f is None or s is None:
            assert f is None or not f.any()
            continue
        assert (f - s).abs().max() <= 1e-5 * s.abs().max()  # RMSNorm computes in float32


def test_changing_a_later_block_does_not_change_earlier_losses(model: DiffCoderLM) -> None:
    # Causality across blocks: the loss of block 0 depends on nothing after it.
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randint(7, VOCAB, (1, 8), generator=gen)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 1] = True
    w = torch.ones(1, 8, dtype=torch.float64)
    a = block_diffusion_loss_sum(model, x0, mask, w, MASK_ID, B)
    x1 = x0.clone()
    x1[0, 4:] = (x1[0, 4:] + 1) % VOCAB
    b = block_diffusion_loss_sum(model, x1, mask, w, MASK_ID, B)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_ar_loss_is_shifted_cross_entropy(model: DiffCoderLM) -> None:
    x = torch.randint(7, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    elig = eligible_positions((2, 12), None, drop_first=True)
    logits = model(x, attn_mask="causal")
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
    assert ar_loss_sum(model, x, elig).item() == pytest.approx(ref.item(), rel=1e-6)  # RMSNorm computes in float32
