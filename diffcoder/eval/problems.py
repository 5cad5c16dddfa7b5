"""Problem sets of the evaluation benchmarks (HumanEval, MBPP, MBPP+, HumanEval infilling), read
from the copies under diffcoder/eval/data, and how to test a sample.

Every problem set (a "benchmark" in `--benchmark`) becomes a list of `Problem`s.
`Problem.job(sample)` turns one sample (a human-eval style `completion`, or an EvalPlus style
full `solution`) into the job the sandboxed judge runs; `Problem.canonical_sample()` is the
reference as a sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from diffcoder.fsutil import read_text

DATA = Path(__file__).with_name("data")

INFILL_FILES = {
    "humaneval-infill-single": "HumanEval-SingleLineInfilling.jsonl.gz",
    "humaneval-infill-multi": "HumanEval-MultiLineInfilling.jsonl.gz",
    "humaneval-infill-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "humaneval-infill-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}
BENCHMARKS = ("humaneval", "mbpp", "mbpp-full", "mbpp-plus", *INFILL_FILES)


@dataclass
class Problem:
    """One benchmark task. `kind` selects how a sample becomes a program."""

    task_id: str
    kind: str  # "humaneval" | "mbpp" | "mbpp-plus" | "infill"
    prompt: str  # code prefix (humaneval, infill) or the problem text (mbpp)
    canonical: str  # the reference completion / solution
    test: str = ""
    entry_point: str | None = None
    suffix: str = ""  # infilling only
    one_line: bool = False  # single-line infilling: the middle is exactly one line
    instruction: str = ""  # natural-language task for instruct models
    extra: dict = field(default_factory=dict)

    def program(self, sample: dict) -> str:
        """The full program for one sample: `solution` is used as is, `completion` is
        placed where the benchmark expects it (after the prompt, or between prefix/suffix)."""
        if sample.get("solution") is not None:
            return str(sample["solution"])
        completion = sample.get("completion")
        if completion is None:
            raise ValueError(f"{self.task_id}: a sample needs 'completion' or 'solution'")
        if self.kind == "infill":
            return self.prompt + str(completion) + self.suffix
        if self.kind == "humaneval":
            return self.prompt + str(completion)
        return str(completion)  # MBPP: the completion is the whole program

    def job(self, sample: dict) -> dict:
        program = self.program(sample)
        if self.kind == "mbpp-plus":
            return {"mode": "io", "program": program, "entry_point": self.entry_point,
                    "reference": self.canonical, "inputs": self.extra["inputs_json"],
                    "atol": self.extra["atol"], "special": self.extra.get("special")}
        return {"mode": "script", "program": program, "test": self.test,
                "check": self.entry_point if self.kind in ("humaneval", "infill") else None}

    def canonical_sample(self) -> dict:
        if self.kind in ("humaneval", "infill"):
            return {"task_id": self.task_id, "completion": self.canonical}
        return {"task_id": self.task_id, "solution": self.canonical}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def _humaneval() -> list[Problem]:
    return [Problem(r["task_id"], "humaneval", r["prompt"], r["canonical_solution"], r["test"],
                    r["entry_point"], instruction=_instruction_from_prompt(r["prompt"]))
            for r in _jsonl(DATA / "humaneval" / "HumanEval.jsonl.gz")]


def _instruction_from_prompt(prompt: str) -> str:
    # EvalPlus-style instruct prompt: the task is the function signature and docstring.
    return ("Complete the following Python function. Return the whole function in a "
            "```python code block.\n\n```python\n" + prompt.strip() + "\n```")


def _mbpp_problem(task_id: str, text: str, code: str, tests: list[str], setup: str) -> Problem:
    test = "\n".join([setup, *tests]).strip() + "\n"
    first = tests[0] if tests else ""
    # Base-model prompt in the EvalPlus MBPP style: the task and one example as a docstring.
    prompt = f'"""\n{text.strip()}\n{first.strip()}\n"""\n'
    instruction = (f"{text.strip()} Your code should pass this test:\n\n{first.strip()}\n\n"
                   "Write the solution as a ```python code block.")
    return Problem(task_id, "mbpp", prompt, code.replace("\r\n", "\n"), test,
                   entry_point=_called_name(first), instruction=instruction,
                   extra={"timeout_factor": SLOW_TASK_TIMEOUT_FACTOR.get(task_id, 1)})


def _called_name(assert_line: str) -> str | None:
    import re

    m = re.search(r"assert\s+(?:\w+\()*?\s*([A-Za-z_]\w*)\(", assert_line)
    return m.group(1) if m else None


def _mbpp_sanitized() -> list[Problem]:
    with open(DATA / "mbpp" / "sanitized-mbpp.json", encoding="utf-8") as f:
        rows = json.load(f)
    return [_mbpp_problem(f"Mbpp/{r['task_id']}", r["prompt"], r["code"], r["test_list"],
                          "\n".join(r["test_imports"])) for r in rows]


def _mbpp_full() -> list[Problem]:
    return [_mbpp_problem(f"Mbpp/{r['task_id']}", r["text"], r["code"], r["test_list"],
                          r["test_setup_code"]) for r in _jsonl(DATA / "mbpp" / "mbpp.jsonl")]


# MBPP+ stores inputs as JSON, which has no tuples, sets or complex numbers. These task ids
# need their inputs converted back (the list is EvalPlus's, from `mbpp_deserialize_inputs`,
# Apache-2.0). `_T`, `_S`, `_C` tag values for the runner's JSON decoder.
def _t(x: Any) -> dict:
    return {"__t": list(x)}


def _deep_t(x: Any) -> Any:
    return _t([_deep_t(i) for i in x]) if isinstance(x, list) else x


_ARGS_TO_TUPLES = {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596,
                   616, 630, 726, 740, 744, 809}
_NESTED_TO_TUPLES = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}
_FIRST_ARG_ITEMS_TO_TUPLES = {75, 413, 444, 753}
_FIRST_ARG_TO_TUPLE = {250, 405, 446, 617, 720, 763, 808}
_CONVERTERS: dict[int, Callable[[list], list]] = {}
for _n in _ARGS_TO_TUPLES:
    _CONVERTERS[_n] = lambda inp: [_t(a) for a in inp]
for _n in _NESTED_TO_TUPLES:
    _CONVERTERS[_n] = lambda inp: [[_t(x) for x in a] for a in inp]
for _n in _FIRST_ARG_ITEMS_TO_TUPLES:
    _CONVERTERS[_n] = lambda inp: [[_t(x) for x in inp[0]], *inp[1:]]
for _n in _FIRST_ARG_TO_TUPLE:
    _CONVERTERS[_n] = lambda inp: [_t(inp[0]), *inp[1:]]
for _n in (259, 401, 445):
    _CONVERTERS[_n] = lambda inp: [_t([_t(x) for x in a]) for a in inp]
_CONVERTERS.update({
    106: lambda inp: [inp[0], _t(inp[1]), *inp[2:]],
    750: lambda inp: [inp[0], _t(inp[1]), *inp[2:]],
    115: lambda inp: [[{"__s": x} if isinstance(x, list) and x else {} for x in inp[0]]],
    124: lambda inp: [{"__f": inp[0]}, {"__c": inp[1]}],
    252: lambda inp: [{"__c": inp[0]}],
    278: lambda inp: [_t([_t(x) if isinstance(x, list) else x for x in inp[0]]), *inp[1:]],
    307: lambda inp: [_t(inp[0]), *inp[1:]],
    722: lambda inp: [{k: _t(v) for k, v in inp[0].items()}, *inp[1:]],
    580: lambda inp: [_deep_t(a) for a in inp],
    615: lambda inp: [_deep_t(a) for a in inp],
    791: lambda inp: [_deep_t(a) for a in inp],
})
# Tasks whose reference alone runs for seconds (MBPP+ on its large plus inputs; Mbpp/123 sums
# amicable numbers below 10,000), found with `python -m diffcoder.eval.report mbpp-plus
# --timeout 60 --slow-above 2.5`. EvalPlus scales time limits by the reference's runtime; we
# scale the per-sample wall limit by about 4x the reference's time on a quiet machine / 10 s,
# since a busy machine was seen to double it.
SLOW_TASK_TIMEOUT_FACTOR = {"Mbpp/599": 30, "Mbpp/392": 8, "Mbpp/271": 8, "Mbpp/123": 5, "Mbpp/255": 5,
                            "Mbpp/603": 4, "Mbpp/592": 3, "Mbpp/589": 3, "Mbpp/389": 3, "Mbpp/84": 3,
                            "Mbpp/300": 3, "Mbpp/583": 2, "Mbpp/630": 2}
# References in the pre-release MBPP+ snapshot that cannot pass their own tests: they return
# `re.Match` objects, and two Match objects never compare equal.
MBPP_PLUS_KNOWN_BROKEN = {"Mbpp/737": "reference returns re.Match", "Mbpp/787": "reference returns re.Match",
                          "Mbpp/794": "reference returns re.Match"}
# EvalPlus's special oracles, keyed by entry point as EvalPlus does.
_SPECIAL = {"are_equivalent": "always_true_or_exact", "sum_div": "always_zero_or_exact"}


def _mbpp_plus() -> list[Problem]:
    problems = []
    for r in _jsonl(DATA / "evalplus" / "MbppPlus-038088e.jsonl.gz"):
        number = int(r["task_id"].split("/")[-1])
        inputs = list(r["base_input"]) + list(r["plus_input"] or [])
        convert = _CONVERTERS.get(number)
        if convert is not None:
            inputs = [convert(list(i) if not isinstance(i, dict) else i) for i in inputs]
        text = r["prompt"].strip().strip("'\"").strip()
        assertion = r["assertion"].strip().splitlines()
        first = assertion[0] if assertion else ""
        problems.append(Problem(
            r["task_id"], "mbpp-plus", f'"""\n{text}\n{first}\n"""\n', r["canonical_solution"],
            entry_point=r["entry_point"],
            instruction=(f"{text} Your code should pass this test:\n\n{first}\n\n"
                         "Write the solution as a ```python code block."),
            extra={"inputs_json": json.dumps(inputs), "atol": float(r["atol"] or 0),
                   "special": _SPECIAL.get(r["entry_point"]), "n_inputs": len(inputs),
                   "timeout_factor": SLOW_TASK_TIMEOUT_FACTOR.get(r["task_id"], 1)}))
    return problems


def _infill(name: str) -> list[Problem]:
    return [Problem(r["task_id"], "infill", r["prompt"], r["canonical_solution"], r["test"],
                    r["entry_point"], suffix=r["suffix"], one_line=name == "humaneval-infill-single")
            for r in _jsonl(DATA / "humaneval_infilling" / INFILL_FILES[name])]


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[Problem, ...]:
    if name == "humaneval":
        return tuple(_humaneval())
    if name == "mbpp":
        return tuple(_mbpp_sanitized())
    if name == "mbpp-full":
        return tuple(_mbpp_full())
    if name == "mbpp-plus":
        return tuple(_mbpp_plus())
    return tuple(_infill(name))


def load_benchmark(name: str, limit: int | None = None) -> list[Problem]:
    """The problems of `name` (one of BENCHMARKS), the first `limit` only when given."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError("--limit must be at least 1")
    problems = list(_load(name))
    return problems[:limit] if limit else problems
