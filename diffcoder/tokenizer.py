"""Tokenizer wrapper: named special ids, the chat template and FIM tokens.

The engine knows only token ids; this module is where text meets ids. It loads any
Hugging Face `tokenizer.json` (never remote code) and looks up the special tokens the model
family needs by name, so no id is ever written inline.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_text, read_json

# Seed-Coder spellings; the trailing alternatives let StarCoder/Qwen-style FIM tokens work too.
BOS_TOKEN = "<[begin▁of▁sentence]>"
EOS_TOKEN = "<[end▁of▁sentence]>"
PAD_TOKEN = "<[PAD▁TOKEN]>"
MASK_TOKEN = "<[MASK_TOKEN]>"
FIM_PREFIX = ("<[fim-prefix]>", "<fim_prefix>", "<|fim_prefix|>")
FIM_SUFFIX = ("<[fim-suffix]>", "<fim_suffix>", "<|fim_suffix|>")
FIM_MIDDLE = ("<[fim-middle]>", "<fim_middle>", "<|fim_middle|>")

# Our own tokenizers put the specials first, in this order (bos 0, eos 2, mask 5 as in Seed-Coder).
SPECIAL_TOKENS = [BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, FIM_PREFIX[0], FIM_SUFFIX[0], MASK_TOKEN, FIM_MIDDLE[0]]

# Seed-Coder chat format: each turn `<bos>{role}\n{content}<eos>`; generation prompt `<bos>assistant\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ bos_token }}{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)


class Tokenizer:
    """Text <-> ids with the special ids as named attributes (None when absent)."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.bos_id: int | None = hf.bos_token_id
        self.eos_id: int | None = hf.eos_token_id
        self.pad_id: int | None = hf.pad_token_id
        self.mask_id = self.token_id(MASK_TOKEN) if self.token_id(MASK_TOKEN) is not None else (
            hf.mask_token_id if getattr(hf, "mask_token", None) else None)
        self.fim_prefix_id = self._first_id(FIM_PREFIX)
        self.fim_suffix_id = self._first_id(FIM_SUFFIX)
        self.fim_middle_id = self._first_id(FIM_MIDDLE)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(f"{tok_file}: missing (diffcoder needs a fast tokenizer.json)")
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            cfg = read_json(cfg_file)
        kwargs = {k: _token_text(cfg[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
                  if cfg.get(k)}
        try:
            hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **kwargs)
        except Exception as exc:  # tokenizers raises plain Exceptions on corrupt files
            raise ValueError(f"{tok_file}: cannot be read as a tokenizer ({exc})") from None
        template = cfg.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.exists():
            template = jinja.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        hf.chat_template = template
        return cls(hf)

    # ----------------------------------------------------------------- ids
    def token_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.hf.unk_token_id and token != self.hf.unk_token else tid

    def _first_id(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            tid = self.token_id(name)
            if tid is not None:
                return tid
        return None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_fim(self) -> bool:
        return None not in (self.fim_prefix_id, self.fim_suffix_id, self.fim_middle_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    # ---------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template'); "
                             "use plain completion instead of chat")
        if not messages:
            raise ValueError("messages is empty: give at least one {'role': ..., 'content': ...}")
        from jinja2.exceptions import TemplateError

        try:
            text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except TemplateError as exc:  # the template's own raise_exception(...), e.g. a role it does not know
            raise ValueError(f"the chat template refused these messages: {exc}") from exc
        # The template writes the special tokens itself; encode without adding more.
        return self.encode(text)

    @property
    def fim_order(self) -> str:
        """The order the model was trained on: "spm" (suffix-prefix-middle) for Seed-Coder's
        `<[fim-...]>` tokens (and ours), "psm" (prefix-suffix-middle) for the `<|fim_...|>` /
        `<fim_...>` spellings of Qwen2.5-Coder, StarCoder and DeepSeek-Coder-style models."""
        return "spm" if self.fim_prefix_id == self.token_id(FIM_PREFIX[0]) else "psm"

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """The infilling prompt in the model's own order (`fim_order`); the model writes the middle:
        spm: <suffix>S<prefix>P<middle>   psm: <prefix>P<suffix>S<middle>."""
        if not self.has_fim:
            raise ValueError("this tokenizer has no FIM tokens (<[fim-prefix]>, <[fim-suffix]>, <[fim-middle]>): "
                             "infilling needs a model trained with them")
        pre, suf = [self.fim_prefix_id] + self.encode(prefix), [self.fim_suffix_id] + self.encode(suffix)
        return (suf + pre if self.fim_order == "spm" else pre + suf) + [self.fim_middle_id]


def _token_text(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


# ------------------------------------------------------------------ building
def byte_level_tokenizer() -> Any:
    """A deterministic byte-level tokenizer (no merges): the specials, then the 256 bytes.

    Used for the untrained default checkpoint and tests; `diffcoder tokenizer train` builds
    real BPE vocabularies with the same special-token layout.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL_TOKENS)
    return tk


def save_tokenizer(raw: Any, out_dir: str | Path, chat_template: str = CHAT_TEMPLATE,
                   model_max_length: int = 8192) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "mask_token": MASK_TOKEN,
        "additional_special_tokens": [FIM_PREFIX[0], FIM_SUFFIX[0], FIM_MIDDLE[0]],
        "chat_template": chat_template,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "mask_token",
                                           "additional_special_tokens")}
    atomic_write_text(out / "tokenizer.json", raw.to_str())
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
