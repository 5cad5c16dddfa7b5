"""The release's `model.generate(input_ids, ...)`, for code written against the published
inference file: same arguments, output shaped like its output, decoded by our engine."""
from __future__ import annotations

import torch

from .decoding import generate


def release_style_output(model: torch.nn.Module, input_ids: torch.Tensor, *, eos_id: int | None,
                         block_length: int, gen_length: int, **kwargs: object) -> torch.Tensor:
    """Prompt + generated ids as the release returns them: cut at the end of the block holding the
    first EOS, EOS from there on; rows padded to a common length with EOS (or the mask id)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    prompts = input_ids.tolist()
    res = generate(model, prompts, eos_id=eos_id, block_length=block_length, gen_length=gen_length, **kwargs)
    rows = []
    for p, gen in zip(prompts, res.tokens):
        seq = p + gen
        if eos_id is not None and gen and gen[-1] == eos_id:
            block_end = min((len(seq) - 1) // block_length * block_length + block_length, len(p) + gen_length)
            seq = seq + [eos_id] * (block_end - len(seq))
        rows.append(seq)
    fill = eos_id if eos_id is not None else (kwargs.get("mask_id") or model.mask_id)
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long, device=input_ids.device)


def release_generate(model: torch.nn.Module, input_ids: torch.Tensor, steps: int = 128, gen_length: int = 128,
                     block_length: int = 4, temperature: float = 0.0, remasking: str = "low_confidence",
                     tokenizer=None, mask_id: int | None = None, threshold: float | None = None,  # noqa: ANN001
                     shift: bool = False, eos_id: int | None = None, seed: int | None = None,
                     **_: object) -> torch.Tensor:
    """The release's `model.generate(input_ids, ...)` as a function of the model: returns prompt +
    generated ids shaped like its output (`release_style_output`). `tokenizer` and any other
    keyword the release accepts are taken and ignored, so release code runs unchanged."""
    return release_style_output(model, input_ids, steps=steps, gen_length=gen_length, block_length=block_length,
                                temperature=temperature, remasking=remasking, mask_id=mask_id, threshold=threshold,
                                shift=shift, eos_id=eos_id, seed=seed)
