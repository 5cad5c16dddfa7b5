"""The judge program: what the sandbox runs for one job, deciding whether ONE untrusted program
passes its tests (see docs/eval.md, "Threat model").

It is standard library only and never imports diffcoder: `program_source()` joins its parts
into one source that runs as two processes inside the sandbox:

- The judge (judge_process.py), `python -s -S -c <source> NONCE_FD RESULT_FD`: reads the JSON
  job from stdin, applies the limits (and under `unshare` builds the sandbox's view:
  confine.py), makes itself non-dumpable, starts the candidate process and runs the tests. No
  code of the program ever runs in the judge.
- The candidate (candidate_process.py), `python -s -S -c <source> candidate REQUEST_FD
  RESPONSE_FD`: started by the judge without the nonce and result pipes, with no capabilities
  and no way to gain any, so neither the judge's file descriptors (/proc/<pid>/fd) nor its
  memory are open to it. It runs the program, then answers the judge's calls of the program's
  names.

Between the two: one JSON array per line, [kind, ...] (program, names, call, value, raise,
status), values as plain data only (wire.py); any other object stays in the candidate, and the
judge gets an opaque handle to it, equal only to itself, that it can call or pass back. So
every comparison the tests make (`assert f(x) == y`, MBPP+'s expected outputs) runs on objects
the judge built itself: nothing the program defined, however its `__eq__` or `__module__`
reads, takes part in deciding a pass.

Protocol with the harness (sandbox.py): stdin carries the job {"mode": "script" | "io", ...}.
NONCE_FD is a pipe holding a random nonce that the judge reads only after the tests passed and
the candidate is gone; RESULT_FD receives one line: "PASS <nonce>", or "<STATUS> <reason>" with
STATUS one of FAILED, ERROR, OOM, TIMEOUT. The harness counts a pass only when the line is
"PASS " + the nonce it wrote and the judge then exited with status 0.

Both processes get the environment the harness gives the judge (its PYTHONHASHSEED included,
so both iterate sets of strings alike) and neither imports from its working directory.
"""
from __future__ import annotations

import ast
from pathlib import Path

# In dependency order: each part uses names of the parts before it; __main__ starts the process.
PARTS = ("wire.py", "verdict.py", "confine.py", "judge_process.py", "candidate_process.py", "__main__.py")


def program_source() -> str:
    """The parts joined into one source for `python -c`.

    The parts import each other package-relatively (so they also read, and import, as a normal
    package); in the joined source those imports are dropped, the names being defined above.
    Checked: each top-level name is defined once, and nothing but `sys` is imported at module
    level, so every import happens after __main__ has filtered sys.path.
    """
    here = Path(__file__).parent
    owner: dict[str, str] = {}
    chunks = []
    for part in PARTS:
        text = (here / part).read_text(encoding="utf-8")
        dropped: set[int] = set()
        for node in ast.parse(text, part).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                dropped.update(range(node.lineno, node.end_lineno + 1))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                if not isinstance(node, ast.Import) or [a.name for a in node.names] != ["sys"]:
                    raise RuntimeError(f"judge/{part}:{node.lineno}: only `import sys` at module level")
            for name in _defined(node):
                if owner.setdefault(name, part) != part:
                    raise RuntimeError(f"judge/{part}: {name} is also defined in {owner[name]}")
        chunks.append("".join(line for n, line in enumerate(text.splitlines(True), 1) if n not in dropped))
    return "\n\n".join(chunks)


def _defined(node: ast.stmt) -> list[str]:
    """Top-level names a statement binds (functions, classes, constants)."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    return []
