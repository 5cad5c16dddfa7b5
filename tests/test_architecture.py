"""The package's import graph: no cycle, and the core's layers import only downwards.

Every import counts, at module level or inside a function (a lazy import keeps start-up fast; it
must not hide a cycle), and so does every string literal that names one of the package's modules
(`importlib.import_module` registries: the CLI's command modules, `diffcoder.__getattr__`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffcoder"

# The core, bottom to top: a module may import its own layer and the ones below, never above.
# Everything else (serve, train, eval, convert, hub, the CLIs) sits on top of the engine.
LAYERS = [
    ("diffcoder.config", "diffcoder.masks", "diffcoder.tokenizer", "diffcoder.fsutil", "diffcoder.hardware"),
    ("diffcoder.kernels",),
    ("diffcoder.model",),
    ("diffcoder.checkpoint", "diffcoder.defaults"),
    ("diffcoder.engine",),
]
TOP_OF_CORE = ("diffcoder.engine.cli",)  # a command: it sits with the other CLIs


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value and node.value in files:
                targets.add(node.value)
        graph[name] = set()
        for target in targets:
            while target and target not in files:  # `from pkg import name`: the module that defines it
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def layer_of(name: str) -> int | None:
    if name.startswith(TOP_OF_CORE):
        return None
    for i, layer in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in layer):
            return i
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_layers_import_only_downwards():
    upward = [f"{src} (layer {layer_of(src)}) imports {dst}"
              for src, targets in import_graph().items() if layer_of(src) is not None
              for dst in sorted(targets) if layer_of(dst) is None or layer_of(dst) > layer_of(src)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_graph_sees_lazy_and_registered_imports():
    graph = import_graph()
    assert "diffcoder.hub" in graph["diffcoder.cli"]  # module level
    assert "diffcoder.engine.cli" in graph["diffcoder.cli"]  # a string in COMMAND_MODULES
    assert "diffcoder.train.adapters" in graph["diffcoder.hub"]  # inside a function
