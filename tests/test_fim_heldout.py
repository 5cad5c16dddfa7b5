"""FIM augmentation of pretraining rows, and the held-out exact-match tasks of the replication."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffcoder.train.batches import FimSpec, PretrainStream, fim_rewrite
from diffcoder.train.datadir import read_manifest
from diffcoder.train.shards import PretrainSplit

FIM = FimSpec(rate=1.0, prefix_id=3, suffix_id=4, middle_id=6, eos_id=2)


@pytest.mark.parametrize("order", ["spm", "psm"])
def test_fim_rewrite_is_a_permutation_in_its_order(order: str) -> None:
    """spm: <suffix> S <prefix> P <middle> M (Seed-Coder); psm: <prefix> P <suffix> S <middle> M
    (Qwen2.5-Coder)."""
    spec = FimSpec(rate=1.0, prefix_id=3, suffix_id=4, middle_id=6, eos_id=2, order=order)
    first, second = (spec.suffix_id, spec.prefix_id) if order == "spm" else (spec.prefix_id, spec.suffix_id)
    window = np.arange(100, 164)
    for seed in range(50):
        out = fim_rewrite(window, np.random.default_rng(seed), spec)
        assert len(out) == len(window) and out[0] == first and out[-1] == spec.eos_id
        k, m = int(np.where(out == second)[0][0]), int(np.where(out == spec.middle_id)[0][0])
        a, b, middle = out[1:k], out[k + 1:m], out[m + 1:-1]
        prefix, suffix = (b, a) if order == "spm" else (a, b)
        # Reassembled prefix + middle + suffix is the window's first len-4 tokens, in order.
        assert np.array_equal(np.concatenate([prefix, middle, suffix]), window[:-4])


def test_stream_fim_rate_and_determinism(train_data_dir: Path) -> None:
    split = PretrainSplit(train_data_dir, "train", read_manifest(train_data_dir))
    plain = PretrainStream(split, 64, seed=0)
    fim = PretrainStream(split, 64, seed=0, fim=FimSpec(0.5, 3, 4, 6, 2))
    a, _ = fim.rows(0, 200)
    b, _ = PretrainStream(split, 64, seed=0, fim=FimSpec(0.5, 3, 4, 6, 2)).rows(0, 200)
    assert np.array_equal(a, b)  # a pure function of (seed, row)
    base, _ = plain.rows(0, 200)
    rewritten = a[:, 0] == FIM.suffix_id
    assert 0.35 < rewritten.mean() < 0.65
    assert np.array_equal(a[~rewritten], base[~rewritten])  # untouched rows are the plain rows
    assert np.array_equal(fim.rows(37, 5)[0], a[37:42])  # resuming mid-stream reads the same rows


def test_fim_rate_validation() -> None:
    from diffcoder.train.config import TrainConfig

    with pytest.raises(ValueError, match="--fim-rate must be in"):
        TrainConfig(data="d", out="o", init="i", fim_rate=1.5).validate()
    with pytest.raises(ValueError, match="not to sft"):
        TrainConfig(data="d", out="o", init="i", objective="sft", fim_rate=0.1).validate()


def test_sft_synth_handles_non_ascii_and_nested_functions(tmp_path: Path) -> None:
    from diffcoder.train.sft_synth import iter_examples

    src = tmp_path / "m.py"
    src.write_text('class K:\n    def méthode(self, x):\n        """Rend « x » doublé."""\n        y = 2 * x\n'
                   '        return y\n', encoding="utf-8")
    (ex,) = list(iter_examples(src, 1500))
    user, reply = ex["messages"][0]["content"], ex["messages"][1]["content"]
    assert 'def méthode(self, x):\n    """Rend « x » doublé."""\n```' in user
    assert reply == '```python\ndef méthode(self, x):\n    """Rend « x » doublé."""\n    y = 2 * x\n    return y\n```'


def _heldout_dir(tmp_path: Path, n_files: int = 3) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    rows = []
    for i in range(n_files):
        f = tmp_path / f"held{i}.py"
        body = "\n".join(f"def f{i}_{j}(a, b):\n    total = a + b * {j}\n    return total - {i}\n" for j in range(12))
        f.write_text("import os\nimport sys\n\n\n" + body)
        rows.append({"path": str(f), "sha256": "x", "split": "validation", "tokens": 1})
    rows.append({"path": str(tmp_path / "train.py"), "sha256": "y", "split": "train", "tokens": 1})
    (d / "files.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_heldout_tasks_are_deterministic_and_consistent(tmp_path: Path) -> None:
    from diffcoder.eval.heldout import KINDS, edit_similarity, make_tasks, score

    d = _heldout_dir(tmp_path)
    tasks = make_tasks(d, n_per_kind=10, seed=3)
    assert tasks == make_tasks(d, n_per_kind=10, seed=3)
    assert [t.kind for t in tasks] == [k for k in KINDS for _ in range(10)]
    for t in tasks:
        text = Path(t.source).read_text()
        assert "train.py" not in t.source
        if t.kind == "next_line":
            assert (t.prefix + t.target + "\n") in text and t.suffix == ""
        else:  # prefix + middle + suffix is a contiguous piece of the file
            assert (t.prefix + t.target + t.suffix) in text
        assert score(t, t.target + "  ") and edit_similarity(t, t.target) == 1.0
        assert not score(t, t.target + "x") and 0.5 < edit_similarity(t, t.target + "x") < 1.0
        # The prompt ends with the line's indentation, the target starts after it.
        assert t.target == t.target.lstrip() and not t.prefix.endswith("\n    \n")
    nl = next(t for t in tasks if t.kind == "next_line")
    assert score(nl, nl.target + "\nanything after the first line")
    with pytest.raises(ValueError, match="only .* candidates"):
        make_tasks(d, n_per_kind=10_000)


@pytest.mark.slow
def test_heldout_run_tasks_scores_a_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    import diffcoder
    from diffcoder.eval.heldout import DecodeStyle, make_tasks, run_tasks

    model = diffcoder.load(tiny_model_dir)
    tasks = make_tasks(_heldout_dir(tmp_path), n_per_kind=2, seed=0)
    for style, bs in ((DecodeStyle("block"), 4), (DecodeStyle("ar"), 1), (DecodeStyle("block", threshold=0.5), 1)):
        r = run_tasks(model, tasks, style, batch_size=bs)
        assert len(r["records"]) == 6 and {"next_line", "infill_line", "infill_multi"} <= set(r)
        for rec in r["records"]:
            assert rec["ok"] == (rec["output"].strip() == rec["target"].strip()) or rec["kind"] == "next_line"
        if bs == 1:
            assert all(r[k]["tokens_per_pass"] > 0 for k in ("next_line", "infill_line", "infill_multi"))
    with pytest.raises(ValueError, match="'ar' or 'block'"):
        DecodeStyle("parallel").kwargs(8)
