"""The engine that runs a block-diffusion model: token ids in, token ids out.

- `decoding.py`: `Decoding` (streaming, batched) and `generate`: the block schedule, the KV
  cache of committed blocks, events per step and per block.
- `rules.py`: one denoising step's rules (proposals, which positions commit).
- `settings.py`: decoder settings: what the caller names > the checkpoint's
  generation_config.json > `DEFAULTS` (shared by `generate`, `infill` and the CLI).
- `runners.py`: how one model pass runs (eager, static shapes, CUDA graphs, compiled).
- `infill.py`: fill-in-the-middle in the tokenizer's own FIM order.
- `release.py`: the release's `model.generate(input_ids, ...)` as a drop-in.
- `cli.py`: `diffcoder generate` and `diffcoder chat`.

Nothing here is imported by this file, so `diffcoder --help` (which registers `cli.py`) does not
start torch.
"""
