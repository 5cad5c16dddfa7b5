"""Reference solutions pass, empty completions fail, on every benchmark (sandbox on).

HumanEval (164) and sanitized MBPP (427) run in full; the larger sets run a deterministic
slice here (every Nth problem) and in full through `python -m diffcoder.eval.report` (see docs/eval.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffcoder.eval.harness import EvalSpec, execute
from diffcoder.eval.problems import BENCHMARKS, MBPP_PLUS_KNOWN_BROKEN, SLOW_TASK_TIMEOUT_FACTOR, load_benchmark
from diffcoder.eval.sandbox import Limits, SandboxUnavailable, detect_isolation

EXPECTED_COUNTS = {"humaneval": 164, "mbpp": 427, "mbpp-full": 974, "mbpp-plus": 399,
                   "humaneval-infill-single": 1033, "humaneval-infill-multi": 5815,
                   "humaneval-infill-span": 1640, "humaneval-infill-span-light": 164}


@pytest.fixture(scope="module")
def tier() -> str:
    try:
        return detect_isolation("auto")
    except SandboxUnavailable as exc:
        pytest.skip(f"no sandbox here: {exc}")


def _run(problems, samples, tmp_path: Path, tier: str, name: str, timeout: float = 10) -> dict:
    spec = EvalSpec(name, tier, Limits(timeout_s=timeout), workers=2)
    return execute(problems, samples, tmp_path / name, spec)


def _failures(tmp_path: Path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / name / "per_problem.jsonl").read_text().splitlines()]
    return [r for r in rows if not r["passed"]]


def test_counts_match_the_published_sets() -> None:
    assert set(EXPECTED_COUNTS) == set(BENCHMARKS)
    for name, count in EXPECTED_COUNTS.items():
        problems = load_benchmark(name)
        assert len(problems) == count, name
        assert len({p.task_id for p in problems}) == count, f"{name}: duplicate task ids"


def test_licences_ship_with_the_data() -> None:
    data = Path(__file__).resolve().parents[1] / "diffcoder" / "eval" / "data"
    for sub in ("humaneval", "humaneval_infilling", "mbpp", "evalplus"):
        assert (data / sub / "LICENSE").is_file(), sub
    assert "CC BY 4.0" in (data / "mbpp" / "LICENSE").read_text()
    assert "pre-release" in (data / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_full_canonical_passes(name: str, tmp_path: Path, tier: str) -> None:
    problems = load_benchmark(name)
    samples = {p.task_id: [p.canonical_sample()] for p in problems}
    results = _run(problems, samples, tmp_path, tier, name)
    assert _failures(tmp_path, name) == []
    assert results["pass@1"] == 1.0 and results["n_problems"] == len(problems)


@pytest.mark.slow
@pytest.mark.parametrize("name,stride", [("mbpp-full", 20), ("mbpp-plus", 10), ("humaneval-infill-single", 25),
                                         ("humaneval-infill-multi", 150), ("humaneval-infill-span", 40),
                                         ("humaneval-infill-span-light", 8)])
def test_canonical_slice_passes(name: str, stride: int, tmp_path: Path, tier: str) -> None:
    slow = set(SLOW_TASK_TIMEOUT_FACTOR)
    problems = [p for p in load_benchmark(name)[::stride]
                if p.task_id not in MBPP_PLUS_KNOWN_BROKEN and p.task_id not in slow]
    samples = {p.task_id: [p.canonical_sample()] for p in problems}
    results = _run(problems, samples, tmp_path, tier, name)
    assert _failures(tmp_path, name) == []
    assert results["pass@1"] == 1.0


@pytest.mark.parametrize("name", ["humaneval", "mbpp", "mbpp-plus", "humaneval-infill-single"])
def test_empty_completions_score_zero(name: str, tmp_path: Path, tier: str) -> None:
    problems = load_benchmark(name)[:12]
    samples = {p.task_id: [{"task_id": p.task_id, "completion": ""}] for p in problems}
    results = _run(problems, samples, tmp_path, tier, name)
    assert results["pass@1"] == 0.0


def test_known_broken_mbpp_plus_references_are_real(tmp_path: Path, tier: str) -> None:
    """The documented exclusions really fail (so the list cannot silently go stale)."""
    problems = [p for p in load_benchmark("mbpp-plus") if p.task_id in MBPP_PLUS_KNOWN_BROKEN]
    samples = {p.task_id: [p.canonical_sample()] for p in problems}
    results = _run(problems, samples, tmp_path, tier, "broken")
    assert len(problems) == len(MBPP_PLUS_KNOWN_BROKEN) and results["pass@1"] == 0.0


def test_mbpp_plus_inputs_are_converted(tmp_path: Path, tier: str) -> None:
    """Tasks whose JSON inputs need tuples / sets / complex numbers pass with the reference."""
    wanted = {"Mbpp/2", "Mbpp/115", "Mbpp/124", "Mbpp/252", "Mbpp/722", "Mbpp/580", "Mbpp/259", "Mbpp/278"}
    problems = [p for p in load_benchmark("mbpp-plus") if p.task_id in wanted]
    assert {p.task_id for p in problems} == wanted
    samples = {p.task_id: [p.canonical_sample()] for p in problems}
    results = _run(problems, samples, tmp_path, tier, "converted")
    assert _failures(tmp_path, "converted") == [] and results["pass@1"] == 1.0


def test_wrong_solution_fails_mbpp_plus_on_plus_inputs(tmp_path: Path, tier: str) -> None:
    """A solution that passes the 3 original MBPP asserts but not the extra inputs fails MBPP+."""
    problem = next(p for p in load_benchmark("mbpp-plus") if p.task_id == "Mbpp/2")
    # The shared elements of the three base tests, hard-coded: right on base_input only.
    cheat = ("def similar_elements(a, b):\n    table = {(3, 4, 5, 6): (4, 5), (1, 2, 3, 4): (3, 4),"
             " (11, 12, 14, 13): (13, 14)}\n    return table.get(tuple(a), ())\n")
    samples = {problem.task_id: [{"task_id": problem.task_id, "solution": cheat}]}
    results = _run([problem], samples, tmp_path, tier, "cheat")
    assert results["pass@1"] == 0.0
