"""The benchmark contamination check (diffcoder/train/contamination.py) and the training sets of
diffcoder-0.5b that it guards (runs/diffcoder_05b/data*/)."""
import json
import re
import sys
from pathlib import Path

import pytest

from diffcoder.eval.problems import load_benchmark
from diffcoder.train.contamination import benchmark_ngrams, overlaps

RUN = Path(__file__).resolve().parent.parent / "runs" / "diffcoder_05b"
sys.path.insert(0, str(RUN))

import make_data  # noqa: E402

N = 10


@pytest.fixture(scope="module")
def index() -> dict:
    return benchmark_ngrams(N)


def test_a_benchmark_solution_is_flagged_however_it_is_spaced_or_cased(index):
    he = load_benchmark("humaneval")[0]
    assert overlaps(he.prompt + he.canonical, index, N) == [he.task_id]
    respaced = "  ".join(he.canonical.upper().split())
    assert he.task_id in overlaps(respaced, index, N)
    mbpp_test = load_benchmark("mbpp")[3].test
    assert overlaps("# some notes\n" + mbpp_test, index, N) != []


def test_code_that_shares_only_short_runs_with_the_benchmarks_passes(index):
    text = Path(make_data.__file__).read_text()
    assert overlaps(text, index, N) == []
    he = load_benchmark("humaneval")[0]
    words = re.findall(r"\w+", he.prompt)
    assert overlaps(" ".join(words[:N - 1]), index, N) == []  # shorter than an n-gram
    assert overlaps(" ".join(words[:N]), index, N) == [he.task_id]


def test_make_data_drops_chats_and_fim_samples_that_hold_benchmark_text(tmp_path):
    he = load_benchmark("humaneval")[2]
    clean_code = "def add(a, b):\n    return a + b\n"
    leaked = he.prompt + he.canonical
    chats = [{"id": 0, "source": "stub", "messages": [{"role": "user", "content": "Add two numbers."},
                                                        {"role": "assistant", "content": clean_code}]},
             {"id": 1, "source": "self-instruct", "messages": [{"role": "user", "content": "Truncate it."},
                                                                {"role": "assistant", "content": leaked}]}]
    fim = [{"id": "fim-0", "fim": {"prefix": "def f(x):\n", "middle": "    y = x + 1\n", "suffix": "    return y\n"}},
           {"id": "fim-1", "fim": {"prefix": he.prompt, "middle": he.canonical, "suffix": ""}}]
    for name, rows in (("chats.jsonl", chats), ("fim.jsonl", fim)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = make_data.decontaminate(tmp_path / "chats.jsonl", tmp_path / "fim.jsonl", tmp_path / "train.jsonl", N)
    kept = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert kept == [{"messages": chats[0]["messages"]}, {"fim": fim[0]["fim"]}]
    assert report["summary"]["chats"] == 2 and report["summary"]["dropped"] == 1 and report["summary"]["kept"] == 1
    assert report["summary"]["fim"] == {"samples": 2, "dropped": 1, "kept": 1}
    assert report["dropped"] == {"1": [he.task_id], "fim-1": [he.task_id]}
    assert json.loads((tmp_path / "contamination.json").read_text()) == report
    # No FIM file: the summary is that of a chats-only set.
    make_data.decontaminate(tmp_path / "chats.jsonl", tmp_path / "none.jsonl", tmp_path / "t2.jsonl", N)
    assert "fim" not in json.loads((tmp_path / "contamination.json").read_text())["summary"]


@pytest.mark.parametrize("data_set", sorted(p.parent.name for p in RUN.glob("data*/train.jsonl.gz")))
def test_every_committed_training_sample_passes_the_check_it_was_made_with(index, data_set):
    from diffcoder.train.sft_data import is_fim, read_samples

    summary = json.loads((RUN / data_set / "contamination.json").read_text())["summary"]
    assert summary["ngram_words"] == N
    samples = read_samples([RUN / data_set / "train.jsonl.gz"])
    for s in samples:
        text = "".join(s.values()) if is_fim(s) else "\n".join(m["content"] for m in s)
        assert overlaps(text, index, N) == []
    fim = sum(map(is_fim, samples))
    assert (len(samples) - fim, fim) == (summary["kept"], summary.get("fim", {}).get("kept", 0))


def test_a_later_set_knows_the_functions_earlier_sets_cut_fim_samples_from(tmp_path):
    import gzip

    old = tmp_path / "data-x"
    old.mkdir()
    (old / "prompts.jsonl.gz").write_bytes(gzip.compress(b""))
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"fim": {"prefix": "def f():\n", "middle": "    return 1\n", "suffix": ""}}]
    (old / "train.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert make_data.earlier_fim_functions([old / "prompts.jsonl.gz"]) == {"def f():\n    return 1\n"}
    committed = [p / "prompts.jsonl.gz" for p in sorted(RUN.glob("data*")) if (p / "prompts.jsonl.gz").exists()]
    fim = sum(json.loads((p.parent / "contamination.json").read_text())["summary"].get("fim", {}).get("kept", 0)
              for p in committed)
    assert len(make_data.earlier_fim_functions(committed)) == fim  # one function per sample, none repeated
