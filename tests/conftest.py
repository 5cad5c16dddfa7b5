"""Shared fixtures: tiny deterministic checkpoints built on the fly (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight checkpoint with a byte-level tokenizer, FIM tokens and a chat template."""
    from diffcoder.defaults import build_untrained

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return build_untrained(path, seed=0, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The untrained default model is cached under DIFFCODER_HOME: keep tests off the user's cache.
    os.environ.setdefault("DIFFCODER_HOME", str(tmp_path_factory.mktemp("diffcoder_home")))


@pytest.fixture(scope="session")
def train_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The byte-level tokenizer (specials + 256 bytes): instant, same layout as trained BPE ones."""
    from diffcoder.tokenizer import byte_level_tokenizer, save_tokenizer

    path = tmp_path_factory.mktemp("train_tok") / "tok"
    save_tokenizer(byte_level_tokenizer(), path)
    return path


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory: pytest.TempPathFactory, train_tokenizer_dir: Path) -> Path:
    """Pretraining data from the stdlib `json` package (a few files, tens of thousands of tokens)."""
    import sysconfig

    from diffcoder.train.data import build_pretrain

    out = tmp_path_factory.mktemp("train_data") / "data"
    src = Path(sysconfig.get_paths()["stdlib"]) / "json"
    build_pretrain([src], train_tokenizer_dir, out, val_fraction=0.2, progress=False)
    return out
