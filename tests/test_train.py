"""The trainer end to end: metrics, resume after SIGKILL (bit-identical), torchrun with 2 processes,
HF-layout outputs, SFT, plotting, and the errors users hit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffcoder.cli import main as cli_main
from diffcoder.train.config import TrainConfig
from diffcoder.train.trainer import train
from helpers import REPO, TINY, cli, metrics, untimed

def base_args(data: Path, tok: Path, cfg: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--tokenizer", str(tok), "--model-config", str(cfg), "--out", str(out),
            "--seq-len", "32", "--batch-size", "4", "--quiet", *extra]


@pytest.fixture(scope="module")
def ar_final(tmp_path_factory: pytest.TempPathFactory, train_data_dir: Path, train_tokenizer_dir: Path,
             tiny_json: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ar"
    cfg = TrainConfig(objective="ar", data=str(train_data_dir), tokenizer=str(train_tokenizer_dir),
                      model_config=str(tiny_json), out=str(out), steps=4, batch_size=4, seq_len=32, lr=3e-3,
                      eval_every=2, eval_batches=1, quiet=True)
    return train(cfg)


def test_ar_run_outputs(ar_final: Path) -> None:
    import diffcoder

    run = ar_final.parent
    recs = metrics(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s"} <= set(r)
    assert "val_loss" in recs[1] and "val_loss" in recs[3] and "val_loss" not in recs[0]
    assert recs[-1]["tokens"] == 4 * 4 * 32
    model = diffcoder.load(ar_final)
    assert model.generation_defaults == {"block_length": 1, "shift": True}
    assert model.tokenizer is not None and model.mask_id == model.tokenizer.mask_id


def test_final_loads_in_transformers_llama(ar_final: Path) -> None:
    from transformers import LlamaForCausalLM

    import diffcoder

    ours = diffcoder.load(ar_final)
    hf = LlamaForCausalLM.from_pretrained(str(ar_final), torch_dtype=torch.float32).eval()
    ids = torch.tensor([[0, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        a = ours(ids, attn_mask="causal")
        b = hf(ids).logits
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_block_diffusion_metrics_warmup_and_clip(train_data_dir: Path, ar_final: Path, tmp_path: Path) -> None:
    out = tmp_path / "bd"
    cfg = TrainConfig(objective="block_diffusion", data=str(train_data_dir), init=str(ar_final), out=str(out),
                      steps=6, batch_size=4, seq_len=32, warmup_steps=4, u_init=0.01, quiet=True)
    final = train(cfg)
    recs = metrics(out)
    assert [r["u_max"] for r in recs[:4]] == pytest.approx([0.01 + 0.99 * s / 4 for s in range(4)])
    assert all(r["u_max"] == 1.0 for r in recs[4:])
    assert [r["weighted"] for r in recs] == [False] * 4 + [True] * 2
    assert all(r["zero_mask_block_frac"] == 0 for r in recs)
    assert all(r["mask_rate"] >= 0.25 for r in recs)
    import diffcoder

    model = diffcoder.load(final)
    assert model.generation_defaults == {"block_length": 4, "shift": False}
    res = diffcoder.generate(model, [[model.tokenizer.bos_id]], steps=8, gen_length=8, block_length=4)
    assert len(res.tokens[0]) == 8


def test_noclip_ablation_shows_empty_blocks(train_data_dir: Path, ar_final: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(objective="block_diffusion", data=str(train_data_dir), init=str(ar_final), out=str(tmp_path / "r"),
                      steps=2, batch_size=8, seq_len=64, no_warmup=True, no_clip=True, no_force_mask=True, quiet=True)
    train(cfg)
    recs = metrics(tmp_path / "r")
    assert sum(r["zero_mask_block_frac"] for r in recs) > 0  # 1/(B+1) expected; 256 blocks per step


DIST_EXTRA = ("--objective", "block_diffusion", "--steps", "6", "--save-every", "3", "--precision", "fp32",
              "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "4", "--eval-batches", "1")
ONE_EXTRA = (*DIST_EXTRA, "--grad-accum", "2")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def one_process_dir(tmp_path_factory: pytest.TempPathFactory, train_data_dir: Path, train_tokenizer_dir: Path,
                    tiny_json: Path) -> Path:
    """The reference: one process, the global batch of 4 in two accumulation micro-steps."""
    out = tmp_path_factory.mktemp("dist") / "one"
    assert cli_main(base_args(train_data_dir, train_tokenizer_dir, tiny_json, out, *ONE_EXTRA)) == 0  # in-process
    return out


@pytest.fixture(scope="module")
def one_process_run(one_process_dir: Path) -> list[dict]:
    return metrics(one_process_dir)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(one_process_dir: Path, train_data_dir: Path,
                                                train_tokenizer_dir: Path, tiny_json: Path, tmp_path: Path) -> None:
    args = base_args(train_data_dir, train_tokenizer_dir, tiny_json, tmp_path / "cut", *ONE_EXTRA)
    killed = cli(*args, env={"DIFFCODER_TRAIN_KILL_AFTER_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))] == ["step-00000003"]
    assert len(metrics(tmp_path / "cut")) == 5 and not (tmp_path / "cut" / "final").exists()
    assert cli_main([*args, "--resume"]) == 0  # in-process: same threads, so bit-identical too
    full = metrics(one_process_dir)
    assert untimed(metrics(tmp_path / "cut")) == untimed(full)
    assert "val_loss" in full[3] and "val_loss" in full[5]
    from safetensors.torch import load_file

    a = load_file(one_process_dir / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The finished run checkpointed its last step too: resuming it again is a no-op.
    assert cli_main([*args, "--resume"]) == 0 and untimed(metrics(tmp_path / "cut")) == untimed(full)


def test_trimming_the_heap_leaves_the_run_unchanged(one_process_dir: Path, train_data_dir: Path,
                                                   train_tokenizer_dir: Path, tiny_json: Path, tmp_path: Path) -> None:
    args = base_args(train_data_dir, train_tokenizer_dir, tiny_json, tmp_path / "plain", *ONE_EXTRA,
                     "--trim-heap-every", "0")
    assert cli_main(args) == 0
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["trim_heap_every"] == 0
    assert json.loads((one_process_dir / "run.json").read_text())["trim_heap_every"] == 1  # the default
    assert untimed(metrics(tmp_path / "plain")) == untimed(metrics(one_process_dir))


# Freed blocks below the mmap threshold stay resident under a live block at the heap's top until
# the heap is trimmed: the pattern of a training step's variable-size tensors. In a fresh process,
# so that no earlier test's heap holes take the blocks; prints the RSS drop the trim gave.
TRIM_PROBE = """
import ctypes, ctypes.util, os
from diffcoder.hardware import release_free_heap
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
size, count = 64 << 10, 2048  # 128 MiB in blocks under glibc's smallest mmap threshold (128 KiB)
blocks = [libc.malloc(size) for _ in range(count)]
for b in blocks:
    ctypes.memset(b, 1, size)
pin = libc.malloc(size)  # keeps the heap's top in use, so free() alone cannot shrink it
for b in blocks:
    libc.free(b)
before = rss()
print(release_free_heap(), before - rss(), size * count)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_release_free_heap_returns_freed_pages_to_the_os() -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True, cwd=REPO)
    trimmed, dropped, freed = out.stdout.split()
    if trimmed == "False":
        pytest.skip("the C library has no malloc_trim (not glibc)")
    assert int(dropped) > int(freed) // 2


def assert_same_trajectory(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra["step"], ra["loss"], rb["loss"])
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
        assert rb["mask_rate"] == ra["mask_rate"] and rb["tokens"] == ra["tokens"]


@pytest.mark.slow
def test_torchrun_ddp_two_processes_match_one_and_resume_alone(
        one_process_run: list[dict], train_data_dir: Path, train_tokenizer_dir: Path, tiny_json: Path,
        tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    two = cli(*base_args(train_data_dir, train_tokenizer_dir, tiny_json, out, *DIST_EXTRA, "--dist", "ddp"),
              launcher=TORCHRUN, env={"DIFFCODER_TRAIN_KILL_AFTER_STEP": "4", "OMP_NUM_THREADS": "1"})
    assert two.returncode != 0  # both ranks were killed after step 4; step 3 is checkpointed
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert (out / "checkpoints" / "step-00000003" / "trainer.pt").exists() and not (out / "final").exists()
    # Resume the 2-process run with a single process: same global batches, same noise.
    assert cli_main(base_args(train_data_dir, train_tokenizer_dir, tiny_json, out, *DIST_EXTRA, "--resume")) == 0
    assert json.loads((out / "run.json").read_text())["world_size"] == 1
    assert_same_trajectory(one_process_run, metrics(out))


@pytest.mark.slow
def test_torchrun_fsdp2_matches_one_process_and_resumes_sharded(
        one_process_run: list[dict], train_data_dir: Path, train_tokenizer_dir: Path, tiny_json: Path,
        tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    args = base_args(train_data_dir, train_tokenizer_dir, tiny_json, out, *DIST_EXTRA, "--dist", "fsdp")
    two = cli(*args, launcher=TORCHRUN, env={"DIFFCODER_TRAIN_KILL_AFTER_STEP": "4", "OMP_NUM_THREADS": "1"})
    assert two.returncode != 0
    assert (out / "checkpoints" / "step-00000003" / "trainer.pt").exists() and not (out / "final").exists()
    res = cli(*args, "--resume", launcher=TORCHRUN, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_trajectory(one_process_run, metrics(out))
    import diffcoder

    assert diffcoder.load(out / "final").config.hidden_size == TINY["hidden_size"]


def test_sft_objective_on_chat_data(tmp_path: Path, ar_final: Path, train_tokenizer_dir: Path) -> None:
    from diffcoder.train.sft_data import build_sft

    chats = [{"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                           {"role": "assistant", "content": f"return {i} + {i + 1}"}]} for i in range(20)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in chats))
    build_sft([src], train_tokenizer_dir, tmp_path / "sft", val_fraction=0.1, progress=False)
    cfg = TrainConfig(objective="sft", data=str(tmp_path / "sft"), init=str(ar_final), out=str(tmp_path / "run"),
                      steps=3, batch_size=2, seq_len=64, eval_every=3, eval_batches=1, quiet=True)
    train(cfg)
    recs = metrics(tmp_path / "run")
    assert all(r["weighted"] for r in recs)  # no corruption warmup by default for SFT
    assert all(0 < r["mask_rate"] <= 1 and r["zero_mask_block_frac"] == 0 for r in recs)
    assert "val_loss" in recs[-1]


def test_sft_rows_append_eos_with_loss_and_never_mask_prompt(tmp_path: Path, train_tokenizer_dir: Path) -> None:
    from diffcoder.tokenizer import Tokenizer
    from diffcoder.train.batches import SFTStream
    from diffcoder.train.datadir import read_manifest
    from diffcoder.train.sft_data import SFTSplit, build_sft

    chats = [{"messages": [{"role": "user", "content": "q" * (i + 1)}, {"role": "assistant", "content": "a"}]}
             for i in range(30)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in chats))
    build_sft([src], train_tokenizer_dir, tmp_path / "s", val_fraction=0.0, progress=False)
    tok = Tokenizer.from_dir(train_tokenizer_dir)
    split = SFTSplit(tmp_path / "s", "train", read_manifest(tmp_path / "s"))
    stream = SFTStream(split, 64, seed=0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    toks, mask = stream.rows(0, 12)
    eos_runs = []
    for row, m in zip(toks, mask):
        learned = row[m]
        text = tok.decode(learned.tolist(), skip_special_tokens=False)
        # Each learned span is "a" + its template EOS + 1..4 appended EOS; prompts ("q...") are never learned.
        assert "q" not in text and "user" not in text
        for span in text.split("a")[1:]:
            eos_runs.append(span.count(tok.hf.eos_token) - 1)
    assert set(eos_runs) <= {1, 2, 3, 4} and len(set(eos_runs)) > 1
    again, _ = SFTStream(split, 64, seed=0, eos_id=tok.eos_id, pad_id=tok.pad_id).rows(5, 3)
    assert (again == toks[5:8]).all()  # rows are a pure function of (seed, index)


# ------------------------------------------------------------------ errors
def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    rc = cli_main(list(args))
    return rc, capsys.readouterr().err


def test_error_tokenizer_vocab_mismatch(capsys: pytest.CaptureFixture, tmp_path: Path, train_data_dir: Path,
                                        tiny_json: Path) -> None:
    from diffcoder.tokenizer import byte_level_tokenizer, save_tokenizer

    other = byte_level_tokenizer()
    other.add_tokens(["<extra-token>"])
    save_tokenizer(other, tmp_path / "tok2")
    out = tmp_path / "run"
    rc, err = run_cli(capsys, *base_args(train_data_dir, tmp_path / "tok2", tiny_json, out, "--steps", "1"))
    assert rc == 2 and "tokenizer mismatch" in err and "rebuild the data" in err
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_error_unknown_config_key(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('objective = "ar"\nlearning_rate = 0.1\n')
    rc, err = run_cli(capsys, "train", "--config", str(toml))
    assert rc == 2 and "unknown key 'learning_rate'" in err and "lr" in err


def test_config_toml_values_and_flag_precedence(tmp_path: Path) -> None:
    from diffcoder.train.config import load_toml, make_config

    toml = tmp_path / "c.toml"
    toml.write_text('objective = "block_diffusion"\nblock-size = 8\nlr = 1\nseq_len = 64\nno_clip = true\n')
    cfg = make_config(load_toml(toml), {"seq_len": 128})
    assert (cfg.objective, cfg.block_size, cfg.lr, cfg.seq_len, cfg.no_clip) == ("block_diffusion", 8, 1.0, 128, True)
    # A flag turns off what the TOML turns on: --no-shift over `shift = true`.
    from diffcoder.cli import build_parser
    from diffcoder.train.cli import config_from_args

    toml.write_text('objective = "sft"\nshift = true\n')
    for argv, want in (([], True), (["--no-shift"], False), (["--shift"], True)):
        args = build_parser().parse_args(["train", "--config", str(toml), *argv])
        assert config_from_args(args).shift is want
    toml.write_text('steps = "ten"\n')
    with pytest.raises(ValueError, match="expected int"):
        make_config(load_toml(toml), {})


def test_error_block_size_must_divide_seq_len(capsys: pytest.CaptureFixture, tmp_path: Path, train_data_dir: Path,
                                              train_tokenizer_dir: Path, tiny_json: Path) -> None:
    rc, err = run_cli(capsys, *base_args(train_data_dir, train_tokenizer_dir, tiny_json, tmp_path / "r",
                                         "--objective", "block_diffusion", "--seq-len", "30"))
    assert rc == 2 and "does not divide --seq-len 30" in err
    assert not (tmp_path / "r").exists()


def test_error_unwritable_output(capsys: pytest.CaptureFixture, tmp_path: Path, train_data_dir: Path,
                                 train_tokenizer_dir: Path, tiny_json: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    rc, err = run_cli(capsys, *base_args(train_data_dir, train_tokenizer_dir, tiny_json, blocker / "run"))
    assert rc == 2 and "cannot write there" in err


def test_error_existing_run_needs_resume(capsys: pytest.CaptureFixture, ar_final: Path, train_data_dir: Path,
                                         train_tokenizer_dir: Path, tiny_json: Path) -> None:
    rc, err = run_cli(capsys, *base_args(train_data_dir, train_tokenizer_dir, tiny_json, ar_final.parent))
    assert rc == 2 and "--resume" in err


def test_error_model_config_unknown_field(capsys: pytest.CaptureFixture, tmp_path: Path, train_data_dir: Path,
                                          train_tokenizer_dir: Path) -> None:
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({**TINY, "hidden_sise": 3}))
    rc, err = run_cli(capsys, *base_args(train_data_dir, train_tokenizer_dir, bad, tmp_path / "r"))
    assert rc == 2 and "unknown field(s) hidden_sise" in err


@pytest.mark.slow
def test_plot_overlays_runs(ar_final: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.png"
    rc = cli_main(["plot", str(ar_final.parent), str(ar_final.parent), "--labels", "a", "b", "--out", str(out)])
    assert rc == 0 and out.read_bytes()[:4] == b"\x89PNG"
    rc, err = run_cli(capsys, "plot", str(tmp_path), "--out", str(out))
    assert rc == 2 and "no metrics.jsonl" in err


@pytest.mark.parametrize("path", sorted((REPO / "runs" / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_pipeline_configs_are_valid(path: Path) -> None:
    from diffcoder.train.config import load_toml, make_config

    cfg = make_config(load_toml(path), {"data": "d", "out": "o", "init": "i"})
    cfg.validate()


def test_lr_schedules() -> None:
    from diffcoder.train.setup import lr_lambda

    cos = lr_lambda(TrainConfig(steps=100, lr=1.0, min_lr=0.1, lr_warmup=10))
    assert [round(cos(s), 6) for s in (0, 9)] == [0.1, 1.0]
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    wsd = lr_lambda(TrainConfig(steps=100, lr=1.0, min_lr=0.0, lr_warmup=0, lr_schedule="wsd", wsd_decay_frac=0.2))
    assert wsd(0) == 1.0 and wsd(79) == 1.0 and wsd(89) == pytest.approx(0.5) and wsd(99) == pytest.approx(0.0)


def test_resume_refuses_code_in_trainer_state(one_process_dir: Path, train_data_dir: Path, train_tokenizer_dir: Path,
                                              tiny_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_process_dir, run)
    shutil.rmtree(run / "final")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 (what a hostile pickle does on load)
            return (os.system, (f"touch {marker}",))

    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    torch.save({"optimizer": Payload()}, ckpt / "trainer.pt")
    args = base_args(train_data_dir, train_tokenizer_dir, tiny_json, run, *ONE_EXTRA, "--resume")
    assert cli_main(args) == 2
    assert "not a trainer state this version can read safely" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_without_a_terminal_steps_are_logged_and_a_report_closes_the_run(
        train_data_dir: Path, train_tokenizer_dir: Path, tiny_json: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(name: str, **kw) -> str:
        train(TrainConfig(objective="ar", data=str(train_data_dir), tokenizer=str(train_tokenizer_dir),
                          model_config=str(tiny_json), out=str(tmp_path / name), steps=12, batch_size=2,
                          seq_len=32, eval_every=12, eval_batches=1, **kw))
        return capsys.readouterr().out

    out = run("piped")
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/12", "10/12", "12/12"]
    assert all(w in steps[0] for w in ("loss", "lr", "tok/s", "elapsed"))
    assert "val_loss" in steps[-1]
    report = out[out.index("done: ar"):]
    for what in ("steps      12", f"{12 * 2 * 32:,} tokens", "wall time", "val loss", "step 12",
                 str(tmp_path / "piped" / "metrics.jsonl"), str(tmp_path / "piped" / "final"), "diffcoder plot"):
        assert what in report, what
    assert "step " not in run("quiet", quiet=True).split("done: ar")[0]
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal: the progress bar, no plain lines
    assert not [line for line in run("tty").splitlines() if line.startswith("step ")]


def test_train_throughput_times_the_every_block_baseline_with_a_prompt_share() -> None:
    """benchmarks/train_throughput.py --prompt-share: a third arm, the same loss with a noisy copy
    of every block; a share outside [0, 1) is refused."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "train_throughput.py"
    flags = ["--models", "tiny", "--steps", "1", "--batch", "2", "--seq-len", "32", "--precision", "fp32"]
    res = subprocess.run([sys.executable, str(script), *flags, "--prompt-share", "0.25"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    line = json.loads(res.stdout.splitlines()[0])
    assert line["prompt_share"] == 0.25 and line["bd_every_block_tokens_per_s"] > 0 and line["bd_over_every_block"] > 0
    bad = subprocess.run([sys.executable, str(script), *flags, "--prompt-share", "1"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "--prompt-share must be in [0, 1)" in bad.stderr
