"""Decoder settings and where each comes from: what the call names (a keyword argument, a CLI
flag) > the checkpoint's generation_config.json (`model.generation_defaults`) > `DEFAULTS`.
No torch here: the CLI resolves settings before it loads anything heavy."""
from __future__ import annotations

from typing import Any

# block_length 4: Stable-DiffCoder's block size.
DEFAULTS: dict[str, Any] = dict(gen_length=128, steps=None, block_length=4, threshold=None, temperature=0.0,
                                remasking="low_confidence", shift=False, seed=None, max_active_blocks=1,
                                block_add_threshold=0.5, speculative=False)


class _ModelDefault:
    """A keyword argument left out: the setting comes from the model, else `DEFAULTS`."""

    def __repr__(self) -> str:
        return "<the model's default>"


MODEL_DEFAULT: Any = _ModelDefault()


def speculative_applies(*, temperature: float, remasking: str, threshold: float | None, steps: int,
                        gen_length: int, max_active_blocks: int = 1) -> bool:
    """Whether settings are ones speculative decoding reproduces (greedy, one token per pass): a
    model whose defaults turn it on decodes so only then, and as asked otherwise."""
    return (temperature == 0 and remasking in ("low_confidence", "left_to_right") and threshold is None
            and steps >= gen_length and max_active_blocks == 1)


def resolve(given: dict[str, Any], model: Any) -> dict[str, Any]:
    """Every setting in `DEFAULTS`: `given` (only what the caller named) > the model's
    generation_config.json > DEFAULTS. steps defaults to gen_length (one token per pass); a
    model's steps count belongs to its gen_length, so it applies only when gen_length is the
    model's too. A model's speculative default applies only where the other settings allow it."""
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown decoder setting(s): {', '.join(sorted(unknown))}")
    saved = getattr(model, "generation_defaults", None) or {}
    kw = {key: given[key] if key in given else saved.get(key, default) for key, default in DEFAULTS.items()}
    if "gen_length" in given and "steps" not in given:
        kw["steps"] = None
    if kw["steps"] is None:
        kw["steps"] = kw["gen_length"]
    if "speculative" not in given and kw["speculative"]:
        kw["speculative"] = speculative_applies(**{k: kw[k] for k in ("temperature", "remasking", "threshold", "steps",
                                                                      "gen_length", "max_active_blocks")})
    return kw
