"""Prompts for base and instruct models, and turning model text back into a sample."""
from __future__ import annotations

import re

from .problems import Problem

# Base-model completions stop where the function body ends: at the next top-level
# statement (the usual Codex / EvalPlus stop sequences).
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n#")
MBPP_STOPS = ("\nassert ", '\n"""', "\nif __name__", "\nprint(", "\n```")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def truncate(text: str, stops: tuple[str, ...]) -> str:
    """`text` cut before the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def extract_code(text: str) -> str:
    """The longest fenced code block of a chat answer, or the whole answer when it has none."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return text.strip("\n")
    return max(blocks, key=len).strip("\n")


def base_prompt(problem: Problem) -> str:
    if problem.kind in ("humaneval", "mbpp", "mbpp-plus"):
        return problem.prompt
    raise ValueError(f"{problem.task_id}: infilling problems use FIM prompts, not completion prompts")


def base_sample(problem: Problem, text: str) -> dict:
    """A base model's continuation of `base_prompt` as a sample record."""
    if problem.kind == "humaneval":
        return {"task_id": problem.task_id, "completion": truncate(text, HUMANEVAL_STOPS)}
    # MBPP: the program is the prompt's docstring (harmless) plus the generated code.
    return {"task_id": problem.task_id, "completion": problem.prompt + truncate(text, MBPP_STOPS)}


def instruct_messages(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem.instruction}]


def instruct_sample(problem: Problem, text: str) -> dict:
    """A chat answer as an EvalPlus-style `solution` (a whole program)."""
    code = extract_code(text)
    if problem.kind == "humaneval":
        if problem.entry_point and f"def {problem.entry_point}" not in code:
            code = problem.prompt + code  # the model answered with the body only
        else:
            code = _prompt_imports(problem.prompt) + code  # keep `from typing import List` etc.
    return {"task_id": problem.task_id, "solution": code}


def _prompt_imports(prompt: str) -> str:
    lines = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join(lines) + "\n" if lines else ""
