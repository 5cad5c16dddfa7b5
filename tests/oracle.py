"""A slow, obviously-correct re-statement of the published decoder's rules, on `transformers`.

No cache: every step recomputes the whole prefix with the block-causal mask (which is what the
release's cache holds, since earlier blocks never see later ones). Batch size 1. It follows
docs/decoding.md rule by rule, with the two fixes listed there (never choose the mask
token; with a threshold keep stepping until the block is decoded).
"""
from __future__ import annotations

import torch

from diffcoder.masks import block_causal_mask


def hf_twin(model, dtype=torch.float64):
    """A transformers.LlamaForCausalLM holding the same weights as our model."""
    import transformers

    cfg = dict(model.config.to_dict())
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.to(dtype).eval()


def release_schedule(m: int, s: int) -> list[int]:
    return [m // s + (1 if j < m % s else 0) for j in range(s)]


@torch.no_grad()
def oracle_generate(hf, prompt, *, steps, gen_length, block_length, mask_id, threshold=None, shift=False,
                    eos_id=None):
    B, P, G = block_length, len(prompt), gen_length
    x = torch.tensor([list(prompt) + [mask_id] * G])
    s = steps // (G // B)
    nfe = 1  # the release prefills the prompt's full blocks once
    for bs in range((P // B) * B, P + G, B):
        be = min(bs + B, P + G)
        m = int((x[0, bs:be] == mask_id).sum())
        schedule = [k for k in release_schedule(m, s) if k > 0]
        j = 0
        while bool((x[0, bs:be] == mask_id).any()):
            mask4 = block_causal_mask(be, B)[None, None]
            logits = hf(x[:, :be], attention_mask=mask4).logits[0].double()
            if shift:
                block_logits = torch.cat([logits[bs - 1:bs] if bs > 0 else torch.zeros_like(logits[:1]),
                                          logits[bs:be - 1]])
            else:
                block_logits = logits[bs:be]
            is_mask = x[0, bs:be] == mask_id
            choice = block_logits.clone()
            choice[:, mask_id] = float("-inf")
            x0 = choice.argmax(-1)
            conf = torch.softmax(block_logits, -1).gather(-1, x0[:, None])[:, 0]
            conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
            if threshold is None:
                picked = torch.topk(conf, schedule[j]).indices.tolist()
            else:
                order = torch.topk(conf, int(is_mask.sum())).indices.tolist()
                picked = [order[0]] + [i for i in order[1:] if conf[i] >= threshold]
            for i in picked:
                x[0, bs + i] = x0[i]
            j += 1
            nfe += 1
        nfe += 1  # the release's separate commit pass
        gen = x[0, max(bs, P):be].tolist()
        if eos_id is not None and eos_id in gen:
            out = x[0, P:be].tolist()
            return out[:out.index(eos_id) + 1], nfe
    return x[0, P:].tolist(), nfe
