"""LoRA runs of the trainer: only the adapter trains, checkpoints hold the adapter and resume exactly,
the merged final equals base + adapter, an adapter continues a run, and bad adapters are refused."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

import diffcoder
from diffcoder.cli import main as cli_main
from diffcoder.train.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_adapter_exact, read_adapter
from diffcoder.train.config import TrainConfig
from diffcoder.train.trainer import train

from helpers import cli, metrics, untimed

pytestmark = pytest.mark.slow  # the slow tier: `make test-fast` skips it

LORA = ("--objective", "block_diffusion", "--shift", "--lora-rank", "4", "--steps", "4", "--save-every", "2",
        "--lr", "1e-2", "--warmup-steps", "2", "--precision", "fp32")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, train_data_dir: Path, train_tokenizer_dir: Path,
             tiny_json: Path) -> Path:
    out = tmp_path_factory.mktemp("lora") / "base"
    cfg = TrainConfig(objective="ar", data=str(train_data_dir), tokenizer=str(train_tokenizer_dir),
                      model_config=str(tiny_json), out=str(out), steps=2, batch_size=4, seq_len=32, quiet=True)
    return train(cfg)


def lora_args(data: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--init", str(base), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--quiet", *LORA, *extra]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, train_data_dir: Path, base_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    assert cli_main(lora_args(train_data_dir, base_dir, out)) == 0
    return out


def test_lora_run_trains_only_the_adapter_and_merges(lora_run: Path, base_dir: Path) -> None:
    cfg, tensors = read_adapter(lora_run / "adapter")
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    assert any(k.endswith("lora_A.weight") for k in tensors) and any("trainable_tokens" in k for k in tensors)
    base = diffcoder.load(base_dir)
    final = diffcoder.load(lora_run / "final")
    assert final.generation_defaults == {"block_length": 4, "shift": True}
    changed = [n for n, p in final.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert not any("norm" in n for n in changed) and "lm_head.weight" not in changed
    # Only the mask token's row of the embedding moved.
    moved = (final.model.embed_tokens.weight != base.model.embed_tokens.weight).any(-1).nonzero().flatten().tolist()
    assert moved == [base.mask_id]
    merged = merge_adapter_exact(diffcoder.load(base_dir), lora_run / "adapter")
    for n, p in final.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[n], p, rtol=0, atol=1e-6)


def test_lora_checkpoint_holds_adapter_and_resumes_bit_identical(lora_run: Path, train_data_dir: Path,
                                                                   base_dir: Path, tmp_path: Path) -> None:
    args = lora_args(train_data_dir, base_dir, tmp_path / "cut")
    killed = cli(*args, env={"DIFFCODER_TRAIN_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt = tmp_path / "cut" / "checkpoints" / "step-00000002"
    assert (ckpt / "adapter" / ADAPTER_WEIGHTS).exists() and not (ckpt / "model").exists()
    assert cli_main([*args, "--resume"]) == 0
    assert untimed(metrics(tmp_path / "cut")) == untimed(metrics(lora_run))


def test_adapter_continues_a_run_and_must_match_rank(lora_run: Path, train_data_dir: Path, base_dir: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "more"
    assert cli_main(lora_args(train_data_dir, base_dir, out, "--adapter", str(lora_run / "adapter"),
                              "--steps", "1", "--lr", "1e-9", "--min-lr", "0", "--save-every", "0")) == 0
    a = read_adapter(lora_run / "adapter")[1]
    b = read_adapter(out / "adapter")[1]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # continued from it, barely moved
    assert cli_main(lora_args(train_data_dir, base_dir, tmp_path / "bad", "--adapter", str(lora_run / "adapter"),
                              "--lora-rank", "8")) == 2
    assert "has rank 4, but --lora-rank is 8" in capsys.readouterr().err


def test_broken_adapters_are_refused_with_a_reason(lora_run: Path, base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        merge_adapter_exact(diffcoder.load(base_dir), tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ADAPTER_CONFIG).write_text((lora_run / "adapter" / ADAPTER_CONFIG).read_text())
    (bad / ADAPTER_WEIGHTS).write_bytes((lora_run / "adapter" / ADAPTER_WEIGHTS).read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        merge_adapter_exact(diffcoder.load(base_dir), bad)
    (bad / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 0}))
    with pytest.raises(ValueError, match="not a LoRA adapter config"):
        merge_adapter_exact(diffcoder.load(base_dir), bad)


def test_lora_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give --init"):
        TrainConfig(data="d", out="o", model_config="tiny", lora_rank=4).validate()
    with pytest.raises(ValueError, match="give --lora-rank too"):
        TrainConfig(data="d", out="o", init="x", adapter="a").validate()
    with pytest.raises(ValueError, match="use --dist ddp"):
        TrainConfig(data="d", out="o", init="x", lora_rank=4, dist="fsdp").validate()
