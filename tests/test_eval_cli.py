"""`diffcoder eval` end to end: samples files, resume, errors, pass@k, and the --model path."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from diffcoder.cli import main
from diffcoder.eval.generation import GenSpec
from diffcoder.eval.passk import mean_pass_at_k, pass_at_k
from diffcoder.eval.problems import load_benchmark
from diffcoder.eval.prompts import extract_code, instruct_sample, truncate, HUMANEVAL_STOPS
from diffcoder.eval.sandbox import SandboxUnavailable, detect_isolation


@pytest.fixture(scope="module")
def sandbox() -> None:
    """Skips tests that execute programs where no sandbox works (pass@k/prompt tests still run)."""
    try:
        detect_isolation("auto")
    except SandboxUnavailable as exc:
        pytest.skip(f"no sandbox here: {exc}")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ pass@k
@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 19, 10),
                                   (200, 17, 100), (5, 5, 5)])
def test_pass_at_k_matches_the_binomial_formula(n: int, c: int, k: int) -> None:
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts() -> None:
    for n, c, k in [(3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    assert mean_pass_at_k([(2, 1), (2, 0)], 1) == pytest.approx(0.25)


# ------------------------------------------------------------------ prompts
def test_code_extraction_and_truncation() -> None:
    answer = "Sure!\n```python\ndef f(x):\n    return x\n```\nand\n```\nprint(1)\n```"
    assert extract_code(answer) == "def f(x):\n    return x"
    assert extract_code("def g():\n    pass\n") == "def g():\n    pass"
    assert truncate("    return 1\n\ndef other():\n    pass", HUMANEVAL_STOPS) == "    return 1\n"
    he = load_benchmark("humaneval", 1)[0]
    sample = instruct_sample(he, "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```")
    assert sample["solution"].startswith("from typing import List\n")


# ------------------------------------------------------------------ CLI
def test_samples_file_resume_and_results(sandbox: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    problems = load_benchmark("humaneval", 4)
    rows = []
    for p in problems:  # sample 0 right, sample 1 wrong, for every problem
        rows.append({"task_id": p.task_id, "completion": p.canonical})
        rows.append({"task_id": p.task_id, "completion": "    return None\n"})
    samples = _write_jsonl(tmp_path / "s.jsonl", rows)
    out = tmp_path / "out"
    args = ["eval", "humaneval", "--samples", str(samples), "--out", str(out), "--limit", "4", "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_problems"] == 4 and results["n_samples"] == 2
    assert results["pass@1"] == pytest.approx(0.5)
    assert set(results) >= {"benchmark", "n_problems", "n_samples", "pass@1", "decoder", "model"}
    per = _rows(out / "per_problem.jsonl")
    assert len(per) == 8 and all({"task_id", "passed", "status", "reason"} <= set(r) for r in per)
    assert "pass@1" in capsys.readouterr().out
    # Resume: a torn last line (a crash mid-append) and a re-run execute only what is missing.
    lines = (out / "per_problem.jsonl").read_text().splitlines()
    (out / "per_problem.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:10])
    assert main(args) == 0
    per2 = _rows(out / "per_problem.jsonl")
    assert len(per2) == 8 and per2[:5] == per[:5]
    assert json.loads((out / "results.json").read_text())["pass@1"] == pytest.approx(0.5)


def test_partial_samples_are_flagged(sandbox: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = load_benchmark("humaneval", 1)[0]
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": p.task_id, "completion": p.canonical}])
    assert main(["eval", "humaneval", "--samples", str(samples), "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert results["complete"] is False and results["n_problems"] == 1 and results["n_problems_total"] == 164
    assert "PARTIAL: 1 of 164 problems" in " ".join(capsys.readouterr().out.split())
    # --limit runs are complete for their subset.
    assert main(["eval", "humaneval", "--samples", str(samples), "--out", str(tmp_path / "one"), "--limit", "1",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["complete"] is True
    assert "PARTIAL" not in capsys.readouterr().out


def test_evalplus_solution_field_is_accepted(sandbox: None, tmp_path: Path) -> None:
    p = load_benchmark("mbpp", 1)[0]
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": p.task_id, "solution": p.canonical}])
    assert main(["eval", "mbpp", "--samples", str(samples), "--out", str(tmp_path / "o"), "--limit", "1",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["pass@1"] == 1.0


@pytest.mark.parametrize("content,message", [
    ('{"task_id": "HumanEval/0", "completion": "x"}\nnot json\n{"task_id": "HumanEval/1", "completion": ""}\n',
     "not valid JSON"),
    ('{"task_id": "NoSuch/1", "completion": "x"}\n', "not in this benchmark"),
    ('{"task_id": "HumanEval/0"}\n', "neither 'completion' nor 'solution'"),
    ("", "no samples"),
])
def test_bad_samples_files_give_one_line_errors(sandbox: None, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                content: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    assert main(["eval", "humaneval", "--samples", str(f), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_flag_errors(sandbox: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "o")
    assert main(["eval", "humaneval", "--model", "m", "--samples", "canonical", "--out", out]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["eval", "humaneval", "--samples", str(tmp_path / "missing.jsonl"), "--out", out]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "humaneval", "--samples", "canonical", "--out", out, "--workers", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "nosuchbench", "--samples", "canonical", "--out", out])


def test_canonical_keyword_writes_samples(sandbox: None, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert main(["eval", "humaneval-infill-single", "--samples", "canonical", "--out", str(out), "--limit", "5",
                 "--no-progress"]) == 0
    assert len(_rows(out / "samples.jsonl")) == 5
    assert json.loads((out / "results.json").read_text())["pass@1"] == 1.0


# ------------------------------------------------------------------ --model
@pytest.mark.parametrize("bench,style", [("humaneval", "base"), ("humaneval", "instruct"), ("mbpp", "auto"),
                                         ("humaneval-infill-single", "auto")])
def test_model_path_generates_resumably(sandbox: None, tmp_path: Path, tiny_model_dir: Path, bench: str,
                                        style: str) -> None:
    out = tmp_path / "o"
    args = ["eval", bench, "--model", str(tiny_model_dir), "--out", str(out), "--limit", "2", "--gen-length", "16",
            "--steps", "8", "--batch-size", "2", "--prompt-style", style, "--device", "cpu", "--dtype", "float32",
            "--no-progress"]
    assert main(args) == 0
    samples = _rows(out / "samples.jsonl")
    assert [s["task_id"] for s in samples] == [p.task_id for p in load_benchmark(bench, 2)]
    assert all(("completion" in s) != ("solution" in s) for s in samples)
    results = json.loads((out / "results.json").read_text())
    assert results["n_problems"] == 2
    assert results["decoder"]["gen_length"] == 16 and results["decoder"]["steps"] == 8
    assert results["model"] == str(tiny_model_dir)
    assert all("raw" in s for s in samples)  # the model's whole text is kept beside the extracted code
    if bench != "humaneval-infill-single":  # 16 tokens, 8 steps: at most 2 per pass (a block shared with the prompt)
        assert all(1 <= s["committed"] <= 16 and s["committed"] / 2 <= s["passes"] <= 12 for s in samples)
        want = sum(s["committed"] for s in samples) / sum(s["passes"] for s in samples)
        assert results["tokens_per_pass"] == pytest.approx(want, abs=1e-4) and 1 < want <= 2
    # Re-running generates nothing new and executes nothing new.
    assert main(args) == 0
    assert _rows(out / "samples.jsonl") == samples
    assert len(_rows(out / "per_problem.jsonl")) == 2


def test_runner_flag_gives_the_same_samples_and_is_recorded(sandbox: None, tmp_path: Path, tiny_model_dir: Path,
                                                           runners_used: list[str]) -> None:
    args = ["eval", "humaneval", "--model", str(tiny_model_dir), "--limit", "2", "--gen-length", "16", "--steps", "8",
            "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--no-execute", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert set(runners_used) == {"auto"}
    assert main([*args, "--out", str(tmp_path / "static"), "--runner", "static"]) == 0
    assert set(runners_used) == {"auto", "static"}
    assert _rows(tmp_path / "static" / "samples.jsonl") == _rows(tmp_path / "auto" / "samples.jsonl")
    assert GenSpec(runner="static").decoder_kwargs()["runner"] == "static"
    assert "runner" not in GenSpec().decoder_kwargs()  # default runs keep their recorded settings unchanged


def test_resume_refuses_results_of_other_samples(sandbox: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = load_benchmark("humaneval", 1)[0]
    out = str(tmp_path / "o")
    first = _write_jsonl(tmp_path / "a.jsonl", [{"task_id": p.task_id, "completion": p.canonical}])
    other = _write_jsonl(tmp_path / "b.jsonl", [{"task_id": p.task_id, "completion": "    return 1\n"}])
    base = ["eval", "humaneval", "--out", out, "--limit", "1", "--no-progress"]
    assert main([*base, "--samples", str(first)]) == 0
    assert main([*base, "--samples", str(other)]) == 2
    assert "different samples" in capsys.readouterr().err
    assert main([*base, "--samples", "canonical"]) == 0  # the same code as a.jsonl: resumes, nothing to run
    assert main([*base, "--samples", "empty"]) == 2
    assert "holds other samples" in capsys.readouterr().err


def test_resume_refuses_other_decoder_settings(tmp_path: Path, tiny_model_dir: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    args = ["eval", "humaneval", "--model", str(tiny_model_dir), "--out", str(out), "--gen-length", "8",
            "--device", "cpu", "--dtype", "float32", "--no-execute", "--no-progress"]
    assert main([*args, "--limit", "1", "--steps", "2"]) == 0
    samples = _rows(out / "samples.jsonl")
    assert json.loads((out / "generation.json").read_text())["steps"] == 2
    assert main([*args, "--limit", "2", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "steps=2" in err and "steps=4" in err and "use a new --out" in err
    assert _rows(out / "samples.jsonl") == samples
    # The recorded settings resume, and more samples per problem may be asked for.
    assert main([*args, "--limit", "2", "--steps", "2", "--n-samples", "2"]) == 0
    assert len(_rows(out / "samples.jsonl")) == 4
    # Samples that no generation.json accounts for (here: the canonical ones) are not added to.
    canon = tmp_path / "c"
    canon.mkdir()
    _write_jsonl(canon / "samples.jsonl", [load_benchmark("humaneval", 1)[0].canonical_sample()])
    assert main([*args[:5], str(canon), *args[6:], "--limit", "1", "--steps", "2"]) == 2
    assert "no record of the settings" in capsys.readouterr().err


def test_resume_refuses_samples_of_other_weights(tmp_path: Path, tiny_model_dir: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """The same model name or folder with other weights (a new release pulled, a retrained
    checkpoint) does not add to samples the old weights made; records that predate the weights'
    sha256 resume on the other settings alone."""
    import shutil

    from diffcoder.checkpoint import WEIGHTS_NAME, weights_sha256
    from diffcoder.fsutil import sha256_file
    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "o"
    args = ["eval", "humaneval", "--model", str(model), "--out", str(out), "--gen-length", "8", "--steps", "2",
            "--device", "cpu", "--dtype", "float32", "--no-execute", "--no-progress"]
    assert main([*args, "--limit", "1"]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["weights_sha256"] == weights_sha256(model) == sha256_file(model / WEIGHTS_NAME)
    tensors = load_file(model / WEIGHTS_NAME)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, model / WEIGHTS_NAME)
    samples = _rows(out / "samples.jsonl")
    assert main([*args, "--limit", "2"]) == 2
    assert "weights_sha256" in capsys.readouterr().err
    assert _rows(out / "samples.jsonl") == samples
    del record["weights_sha256"]
    (out / "generation.json").write_text(json.dumps(record))
    assert main([*args, "--limit", "2"]) == 0 and len(_rows(out / "samples.jsonl")) == 2


def test_no_execute_writes_samples_only(sandbox: None, tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "o"
    assert main(["eval", "humaneval", "--model", str(tiny_model_dir), "--out", str(out), "--limit", "1",
                 "--gen-length", "8", "--steps", "2", "--device", "cpu", "--dtype", "float32", "--no-execute",
                 "--no-progress"]) == 0
    assert len(_rows(out / "samples.jsonl")) == 1 and not (out / "per_problem.jsonl").exists()
    assert main(["eval", "humaneval", "--samples", "canonical", "--out", str(tmp_path / "x"),
                 "--no-execute"]) == 2


def test_model_defaults_to_the_shipped_one(tmp_path: Path) -> None:
    """Without --model (and without --samples) eval generates with the shipped model, as its help
    and the README say."""
    out = tmp_path / "o"
    assert main(["eval", "humaneval", "--out", str(out), "--limit", "1", "--gen-length", "8", "--steps", "2",
                 "--no-execute", "--no-progress"]) == 0
    assert [s["task_id"] for s in _rows(out / "samples.jsonl")] == ["HumanEval/0"]
    help_text = build_parser_help("eval")
    assert "default: the model shipped with diffcoder" in help_text


def build_parser_help(command: str) -> str:
    from diffcoder.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())


def test_stop_after_code_stops_rows_and_is_recorded(sandbox: None, tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from diffcoder.eval import generation

    args = ["eval", "humaneval", "--model", str(tiny_model_dir), "--limit", "2", "--gen-length", "32", "--steps", "32",
            "--batch-size", "2", "--prompt-style", "instruct", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    # The tiny model writes no code fences: let any text count as a closed block.
    monkeypatch.setattr(generation, "_CLOSED_BLOCK", re.compile(r"\S"))
    assert main([*args, "--out", str(tmp_path / "stop"), "--stop-after-code"]) == 0
    full, stop = _rows(tmp_path / "full" / "samples.jsonl"), _rows(tmp_path / "stop" / "samples.jsonl")
    assert all(s["committed"] == 32 for s in full)
    assert all(s["committed"] < 32 for s in stop)
    assert json.loads((tmp_path / "stop" / "results.json").read_text())["decoder"]["stop_after_code"] is True


def test_single_line_infilling_scores_the_first_line_only() -> None:
    """A model that goes on past the missing line (an instruct model's FIM) is cut at the first
    newline, as InCoder's single-line evaluation does; other infilling keeps the whole middle."""
    from diffcoder.eval.generation import _to_sample

    single = load_benchmark("humaneval-infill-single", 1)[0]
    multi = load_benchmark("humaneval-infill-multi", 1)[0]
    text = single.canonical.rstrip("\n") + "\n    return False\n\n# more code\n"
    assert single.one_line and not multi.one_line
    assert _to_sample(single, "base", text, {})["completion"] == single.canonical.rstrip("\n") + "\n"
    assert _to_sample(single, "base", text, {})["raw"] == text
    assert _to_sample(multi, "base", text, {})["completion"] == text
    assert _to_sample(single, "base", "x = 1", {})["completion"] == "x = 1"  # no newline: kept whole


def test_refused_decoder_flags_leave_no_settings_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A run refused for its decoder flags must not record them: the corrected run then starts
    cleanly instead of being refused as a resume with other settings."""
    out = tmp_path / "o"
    common = ["eval", "humaneval", "--model", str(tiny_model_dir), "--out", str(out), "--limit", "1",
              "--gen-length", "8", "--device", "cpu", "--dtype", "float32", "--no-progress", "--no-execute"]
    assert main([*common, "--max-active-blocks", "2"]) == 2  # pipelining needs a threshold
    assert not (out / "generation.json").exists()
    assert main(common) == 0
    assert (out / "generation.json").exists()
