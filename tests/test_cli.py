"""The terminal commands, run as a user would (subprocess, real checkpoint directory)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import diffcoder


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffcoder.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_help_lists_every_flag():
    top = run("--help")
    assert top.returncode == 0 and "generate" in top.stdout and "chat" in top.stdout
    for cmd in ("generate", "chat"):
        out = run(cmd, "--help").stdout
        for flag in ("--model", "--steps", "--gen-length", "--block-length", "--threshold", "--temperature",
                     "--remasking", "--shift", "--seed", "--show-steps", "--runner"):
            assert flag in out, (cmd, flag)


def test_building_the_parser_does_not_import_torch():
    """`diffcoder --help` (and every flag list) stays free of torch's start-up time."""
    code = "import sys; from diffcoder.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stdout + res.stderr


@pytest.mark.slow
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


def test_generate_speculative_prints_the_same_text_in_fewer_passes(tiny_model_dir):
    args = ["generate", "--model", str(tiny_model_dir), "--gen-length", "32", "--dtype", "float32",
            "class Stack:\n    def push(self"]
    plain, spec = run(*args), run(*args, "--speculative")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout

    def passes(res) -> int:  # noqa: ANN001
        return int(res.stderr.split(" forward passes")[0].rsplit(" ", 1)[1])
    assert passes(spec) < passes(plain)


def test_a_models_speculative_default_applies_only_where_it_can():
    """generation_config.json may turn speculative decoding on; a flag that rules it out (sampling,
    a threshold, fewer steps) then decodes as asked, and --no-speculative turns it off."""
    import argparse
    import types

    from diffcoder.engine.cli import decoder_kwargs
    from diffcoder.engine.settings import DEFAULTS

    model = types.SimpleNamespace(generation_defaults={"speculative": True, "gen_length": 16})

    def spec(**flags) -> bool:  # noqa: ANN003
        return decoder_kwargs(argparse.Namespace(**{**dict.fromkeys(DEFAULTS), **flags}), model)["speculative"]
    assert spec() is True
    assert spec(threshold=0.9) is False and spec(temperature=0.7) is False and spec(steps=8) is False
    assert spec(remasking="random") is False and spec(speculative=False) is False
    assert spec(speculative=True, threshold=0.9) is True  # asked for by flag: the engine's check explains the clash


def test_a_models_steps_belong_to_its_gen_length():
    """A saved steps count is for the saved gen_length: naming another gen_length decodes one token
    per pass, not the saved count (40 tokens with steps 128 is not a whole number of steps per block)."""
    import argparse
    import types

    from diffcoder.engine.cli import decoder_kwargs
    from diffcoder.engine.settings import DEFAULTS

    model = types.SimpleNamespace(generation_defaults={"gen_length": 128, "steps": 64})

    def kw(**flags):  # noqa: ANN003, ANN202
        got = decoder_kwargs(argparse.Namespace(**{**dict.fromkeys(DEFAULTS), **flags}), model)
        return got["gen_length"], got["steps"]
    assert kw() == (128, 64) and kw(gen_length=40) == (40, 40) and kw(gen_length=40, steps=10) == (40, 10)
    assert kw(steps=32) == (128, 32)


@pytest.mark.slow
def test_generate_reads_stdin_and_chat_template(tiny_model_dir):
    res = run("generate", "--model", str(tiny_model_dir), "--chat", "--gen-length", "8", "-", stdin="hello")
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_chat_reads_turns_from_a_pipe(tiny_model_dir):
    res = run("chat", "--model", str(tiny_model_dir), "--gen-length", "8", stdin="hi\n/reset\nagain\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("forward passes") == 2


@pytest.mark.slow
def test_chat_with_the_compiled_runner_says_what_eager_says(tiny_model_dir):
    """`--runner compiled_static` from the terminal: two turns of different lengths (the second
    reuses the first's graphs through the length bucket), the same answers as the eager runner."""
    args = ["chat", "--model", str(tiny_model_dir), "--gen-length", "8", "--dtype", "float32"]
    eager = run(*args, stdin="hi\nagain\n")
    compiled = run(*args, "--runner", "compiled_static", stdin="hi\nagain\n")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout.strip() and compiled.stdout == eager.stdout
    assert compiled.stderr.count("forward passes") == 2


@pytest.mark.parametrize("args,match", [
    (["--gen-length", "10"], "multiple of block_length"),
    (["--threshold", "2"], "threshold"),
    (["--steps", "3", "--gen-length", "8"], "steps"),
    (["--speculative", "--threshold", "0.9"], "no threshold"),
])
@pytest.mark.slow
def test_bad_flags_give_one_line_errors(tiny_model_dir, args, match):
    res = run("generate", "--model", str(tiny_model_dir), *args, "x")
    assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""


@pytest.mark.slow
def test_missing_model_dir(tmp_path):
    res = run("generate", "--model", str(tmp_path / "nope"), "x")
    assert res.returncode == 2 and "not a directory" in res.stderr and "Traceback" not in res.stderr


def test_shipped_default_model_is_the_trained_one():
    """diffcoder-tiny ships in the package: the default of every command, no download, no stand-in."""
    from diffcoder.defaults import SHIPPED_DIR, default_model_dir

    assert default_model_dir(announce=False) == SHIPPED_DIR
    files = {p.name for p in SHIPPED_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "MODEL_CARD.md"} <= files
    weights = list(SHIPPED_DIR.glob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in weights) < 60e6
    model = diffcoder.load(SHIPPED_DIR)
    assert model.dtype == torch.bfloat16 and model.tokenizer.has_fim and model.tokenizer.has_chat_template
    assert model.generation_defaults.get("block_length") == 4 and not model.generation_defaults.get("shift")
    assert "diffcoder_untrained" not in model.generation_defaults
    card = (SHIPPED_DIR / "MODEL_CARD.md").read_text()
    for section in ("## Architecture", "## Training", "## Data and licences", "## Decoding defaults",
                    "## Measured", "## What it cannot do"):
        assert section in card


@pytest.mark.slow
def test_generate_without_model_uses_the_shipped_model():
    res = run("generate", "--gen-length", "16", "def fibonacci(n):")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def fibonacci(n):") and len(res.stdout) > len("def fibonacci(n):")
    assert "UNTRAINED" not in res.stderr


def test_untrained_stand_in_when_no_model_ships(tmp_path, monkeypatch):
    from diffcoder import defaults

    monkeypatch.setattr(defaults, "SHIPPED_DIR", tmp_path / "absent")
    monkeypatch.setenv("DIFFCODER_HOME", str(tmp_path))
    path = defaults.default_model_dir(announce=False)
    assert path.parent == tmp_path and (path / "config.json").exists()
    assert diffcoder.load(path).generation_defaults.get("diffcoder_untrained") is True


class _Terminal:
    def isatty(self) -> bool:
        return True


def _drive_chat(monkeypatch, tiny_model_dir, lines, fail_on=()):
    """`diffcoder chat` in this process on a terminal: `lines` are typed (an exception is raised
    at the prompt instead); the answers to the turns numbered in `fail_on` are interrupted.
    Returns the exit code and the chat-templated prompts the model was asked to answer."""
    from diffcoder.engine import cli as run_cli
    from diffcoder.cli import main

    typed = iter(lines)

    def fake_input(prompt=""):
        item = next(typed, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    prompts = []
    decode = run_cli.stream_decode

    def spy(model, ids, kw, show_steps, out=None, echo=""):
        prompts.append(model.tokenizer.decode(ids, skip_special_tokens=False))
        if len(prompts) in fail_on:
            raise KeyboardInterrupt
        return decode(model, ids, kw, show_steps, out, echo)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr(run_cli, "stream_decode", spy)
    code = main(["chat", "--model", str(tiny_model_dir), "--gen-length", "8", "--device", "cpu", "--dtype",
                 "float32"])
    return code, prompts


def test_chat_commands_never_reach_the_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFCODER_HOME", str(tmp_path))
    (tmp_path / "chat_history").write_text("from last time\n")
    code, prompts = _drive_chat(monkeypatch, tiny_model_dir, ["/help", "hi", "/reset", "/bogus", "again", "/exit",
                                                             "never read"])
    err = capsys.readouterr().err
    assert code == 0 and len(prompts) == 2
    assert "/help" not in "".join(prompts) and "/bogus" not in "".join(prompts)
    assert "hi" in prompts[0] and "hi" not in prompts[1] and "again" in prompts[1]
    assert err.startswith(f"loading {tiny_model_dir}...")
    for command in ("/help", "/reset", "/exit"):
        assert f"\n  {command} " in err  # listed by /help
    assert "conversation cleared" in err and "unknown command /bogus" in err
    history = (tmp_path / "chat_history").read_text().splitlines()
    assert history[0] == "from last time" and {"/help", "hi", "/reset", "again", "/exit"} <= set(history)


def test_ctrl_c_stops_an_answer_and_keeps_the_conversation(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFCODER_HOME", str(tmp_path))
    code, prompts = _drive_chat(monkeypatch, tiny_model_dir, ["first", "second", "third", KeyboardInterrupt(),
                                                             "never read"], fail_on=(2,))
    assert code == 0 and len(prompts) == 3
    assert "first" in prompts[2] and "second" not in prompts[2] and "third" in prompts[2]
    assert "stopped" in capsys.readouterr().err


def test_version_flag():
    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"diffcoder {diffcoder.__version__}"


@pytest.mark.parametrize("args", [["generate", "x"], ["chat"], ["serve", "--port", "0"],
                                  ["eval", "humaneval", "--limit", "1", "--no-execute", "--out", "OUT"]])
def test_device_cuda_without_cuda_is_one_line(args, tmp_path, monkeypatch, capsys):
    from diffcoder.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("chat read a line"))
    assert main([a.replace("OUT", str(tmp_path / "o")) for a in args] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "CUDA is not available" in err[-1] and "--device cpu or auto" in err[-1] and "Traceback" not in "".join(err)
