"""The terminal commands, run as a user would (subprocess, real checkpoint directory)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import diffcoder


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffcoder.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_every_flag():
    top = run("--help")
    assert top.returncode == 0 and "generate" in top.stdout and "chat" in top.stdout
    for cmd in ("generate", "chat"):
        out = run(cmd, "--help").stdout
        for flag in ("--model", "--steps", "--gen-length", "--block-length", "--threshold", "--temperature",
                     "--remasking", "--shift", "--seed", "--show-steps"):
            assert flag in out, (cmd, flag)


def test_generate_streams_the_same_tokens_as_the_api(tiny_model_dir):
    res = run("generate", "--model", str(tiny_model_dir), "--gen-length", "16", "--steps", "8", "--dtype",
              "float32", "--show-steps", "def add(a, b):")
    assert res.returncode == 0, res.stderr
    model = diffcoder.load(tiny_model_dir)
    tok = model.tokenizer
    want = diffcoder.generate(model, [tok.encode("def add(a, b):")], steps=8, gen_length=16, eos_id=tok.eos_id)
    text = tok.decode([t for t in want.tokens[0] if t != tok.eos_id])
    assert res.stdout == "def add(a, b):" + text + "\n"
    assert "forward passes" in res.stderr and "step 0" in res.stderr


def test_generate_reads_stdin_and_chat_template(tiny_model_dir):
    res = run("generate", "--model", str(tiny_model_dir), "--chat", "--gen-length", "8", "-", stdin="hello")
    assert res.returncode == 0, res.stderr


def test_chat_reads_turns_from_a_pipe(tiny_model_dir):
    res = run("chat", "--model", str(tiny_model_dir), "--gen-length", "8", stdin="hi\n/reset\nagain\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("forward passes") == 2


@pytest.mark.parametrize("args,match", [
    (["--gen-length", "10"], "multiple of block_length"),
    (["--threshold", "2"], "threshold"),
    (["--steps", "3", "--gen-length", "8"], "steps"),
])
def test_bad_flags_give_one_line_errors(tiny_model_dir, args, match):
    res = run("generate", "--model", str(tiny_model_dir), *args, "x")
    assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_missing_model_dir(tmp_path):
    res = run("generate", "--model", str(tmp_path / "nope"), "x")
    assert res.returncode == 2 and "not a directory" in res.stderr and "Traceback" not in res.stderr


def test_default_model_is_labelled_untrained_or_shipped(tmp_path, monkeypatch):
    from diffcoder.defaults import SHIPPED_DIR, default_model_dir

    monkeypatch.setenv("DIFFCODER_HOME", str(tmp_path))
    path = default_model_dir(announce=False)
    assert (path / "config.json").exists()
    if path != SHIPPED_DIR:
        assert path.parent == tmp_path
        again = diffcoder.load(default_model_dir(announce=False))
        assert again.generation_defaults.get("diffcoder_untrained") is True


def test_bench_decode_subcommand_prints_json_last():
    import json

    res = run("bench", "decode", "--shape", "tiny", "--gen-length", "8", "--prompt-len", "8", "--repeats", "1")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["tokens_identical"] is True and summary["ours"]["batch1"]["tokens"] == 8
