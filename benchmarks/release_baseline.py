"""The baseline: the published decoder's approach, on `transformers.LlamaForCausalLM`.

Batch 1, a dynamic cache, the prompt's full blocks prefilled once, every denoising step
forwarding the block against the cache and throwing its keys away (crop), a separate commit
pass per finished block, float64 softmax over the whole vocabulary at every block position.
The mask token is excluded from the choice (otherwise the release crashes on random weights,
and there would be nothing to compare); everything else follows the release's rules, so the
tokens must equal ours.
"""
from __future__ import annotations

import inspect
import itertools

import torch


def _block_causal(q_pos: torch.Tensor, k_len: int, B: int) -> torch.Tensor:
    k_pos = torch.arange(k_len, device=q_pos.device)
    return ((k_pos[None, :] // B) <= (q_pos[:, None] // B))[None, None]


@torch.no_grad()
def baseline_generate(hf, input_ids: torch.Tensor, *, steps: int, gen_length: int, block_length: int,
                     mask_id: int, threshold: float | None = None, eos_id: int | None = None,
                     temperature: float = 0.0) -> tuple[torch.Tensor, int]:
    """Returns (generated ids [gen], forward passes). input_ids: [1, P]."""
    from transformers import DynamicCache

    dev = input_ids.device
    B, P, G = block_length, input_ids.shape[1], gen_length
    x = torch.cat([input_ids, torch.full((1, G), mask_id, device=dev, dtype=torch.long)], 1)
    s = steps // (G // B)
    start = (P // B) * B
    cache = DynamicCache()
    # transformers renamed `past_key_values` to `cache` in late 5.x releases; the release used the former.
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    nfe = 0
    if start > 0:
        pos = torch.arange(start, device=dev)
        hf(x[:, :start], attention_mask=_block_causal(pos, start, B), **{kw: cache}, use_cache=True)
        nfe += 1
    for bs in range(start, P + G, B):
        be = min(bs + B, P + G)
        pos = torch.arange(bs, be, device=dev)
        block_mask = _block_causal(pos, be, B)
        is_mask = x[0, bs:be] == mask_id
        m = int(is_mask.sum())
        sched = [m // s + (1 if j < m % s else 0) for j in range(s)]
        for j in (range(s) if threshold is None else itertools.count()):
            if threshold is None and sched[j] == 0:
                continue
            is_mask = x[0, bs:be] == mask_id
            if not bool(is_mask.any()):
                break
            logits = hf(x[:, bs:be], attention_mask=block_mask, **{kw: cache}, use_cache=True,
                        position_ids=pos[None]).logits[0]
            cache.crop(-(be - bs))  # the noisy block's keys are thrown away
            nfe += 1
            choice = logits.to(torch.float64)
            choice[:, mask_id] = float("-inf")
            x0 = choice.argmax(-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            conf = torch.gather(p, -1, x0[:, None])[:, 0]
            conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
            if threshold is None:
                picked = torch.topk(conf, sched[j]).indices
            else:
                order = torch.topk(conf, int(is_mask.sum())).indices
                keep = torch.cat([order[:1], order[1:][conf[order[1:]] >= threshold]])
                picked = keep
            x[0, bs + picked] = x0[picked]
        gen = x[0, max(bs, P):be]
        if eos_id is not None and bool((gen == eos_id).any()):
            out = x[0, P:be].tolist()
            return torch.tensor(out[:out.index(eos_id) + 1]), nfe
        hf(x[:, bs:be], attention_mask=block_mask, **{kw: cache}, use_cache=True,
           position_ids=pos[None])  # the separate commit pass
        nfe += 1
    return x[0, P:].cpu(), nfe
